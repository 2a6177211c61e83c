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

Images are scored at their own 0.5 mm: each crop is resampled to the model's 1 mm and the
probabilities back (``evaluate(spacing=…)``), as a user's 0.5 mm slice would be. Every figure
is a mean over slices with its standard error; the model's difference from the best reader is
paired by slice. ``tune`` never reads the test split; ``test`` changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
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


def _load_split(data: str, items: int | None, skip: int = 0):
    from napari_berdiff.data.layout import load_dataset

    ds = load_dataset(data)
    stop = skip + items if items else None
    return ds[skip:stop] if (skip or items) else ds


def _evaluate(model_path: str, data: str, items: int | None, steps: int | None,
              baseline: str | None, n: int, seed: int, diffusion: Any = None):
    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.training.evaluate import evaluate

    model = load_model(model_path)
    if diffusion is not None:
        model = DiffusionModel(model.net, diffusion, model.metadata)
    base = load_model(baseline) if baseline else None
    ds = _load_split(data, items)
    return ds, evaluate(model, ds, n=n, steps=steps, seed=seed, baseline=base, progress=True)


# ---------------------------------------------------------------------------- tune
def cmd_tune(args: argparse.Namespace) -> int:
    """Score sampling candidates on validation slices; store the best in the model file."""
    from napari_berdiff.checkpoints import load_model, save_model

    desc = json.loads((Path(args.data) / "dataset.json").read_text())
    if desc.get("split") != "val":
        raise SystemExit(f"tune reads the validation split only; {args.data} is "
                         f"{desc.get('split')!r}")
    model = load_model(args.model)
    rows, first = [], None
    for cand in args.candidates:
        steps, tau = (int(cand.split(":")[0]), float(cand.split(":")[1]))
        diffusion = model.diffusion.replace(temperature=tau, default_steps=steps)
        _, rep = _evaluate(args.model, args.data, args.items, steps, None, args.n, args.seed,
                           diffusion)
        ged = np.asarray(rep.per_item["model"]["ged2"])
        first = ged if first is None else first
        g, gs, k = mean_sem(ged)
        h, hs, _ = mean_sem(rep.per_item["model"]["hm_iou"])
        d, ds_, _ = mean_sem(ged - first)
        row = {"steps": steps, "temperature": tau, "ged2": g, "ged2_sem": gs, "hm_iou": h,
               "hm_iou_sem": hs, "ged2_minus_first": d, "ged2_minus_first_sem": ds_,
               "n_items": k}
        print(json.dumps(row), flush=True)
        rows.append(row)
    best = min(rows, key=lambda r: r["ged2"])
    chosen = model.diffusion.replace(default_steps=best["steps"], temperature=best["temperature"])
    tuned = {"data": desc.get("description", args.data), "split": "val", "items": args.items,
             "n": args.n, "candidates": rows, "chosen_by": "lowest mean GED²"}
    if args.dry_run:
        print("dry run: the model file is unchanged")
        return 0
    tmp = Path(args.model).with_name(Path(args.model).name + ".tmp")
    save_model(model, tmp, diffusion=chosen, metadata={"sampling_tuned": tuned})
    tmp.replace(args.model)
    print(f"stored {best['steps']} steps, temperature {best['temperature']:g} in {args.model}")
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
    ds, rep = _evaluate(args.model, args.data, args.items, None, args.baseline, args.n,
                        args.seed)
    summary = rep.summary()
    best = summary["best_annotator"]["which"]
    paired = mean_sem(np.asarray(rep.per_item["model"]["ged2"])
                      - np.asarray(rep.per_item[best]["ged2"]))[:2]
    groups = breakdown(ds, rep, best)
    text = markdown(summary, groups, paired)
    print(text)
    doc = {"summary": summary, "breakdown": groups, "paired_model_minus_best_reader": paired,
           "settings": {**rep.settings, "n": rep.n, "items": len(ds), "data": args.data},
           "seconds": rep.seconds, "machine": machine(), "markdown": text}
    Path(args.json).write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("tune", "test"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--items", type=int, default=None, help="only the first items")
        p.add_argument("--n", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
    t = sub.choices["tune"]
    t.add_argument("--candidates", nargs="+", default=["10:1", "10:0.5", "5:1", "5:0.5"],
                   help="steps:temperature")
    t.add_argument("--dry-run", action="store_true")
    s = sub.choices["test"]
    s.add_argument("--baseline", help="the deterministic U-Net file")
    s.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    return {"tune": cmd_tune, "test": cmd_test}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
