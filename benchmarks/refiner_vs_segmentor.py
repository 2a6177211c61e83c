"""Does the refiner improve its segmentor? (issue 23, item 1)

Per phantom, against the annotators' majority mask (frequency >= 0.5; cases where it is
empty are skipped), Dice and HD95 of

- ``segmentor``: the bundled segmentor's mask (probability > 0.5);
- ``PRIOR/STEPS/CONSENSUS``: the refiner's consensus of ``--n`` samples, from the prior
  ``seg`` (the segmentor's probability map used as p) or ``segmask:TRUST`` (its binary mask
  softened with ``mask_to_prior(trust)``); the consensus is one of ``RULES``: ``vote``
  (frequency of the binary samples >= 0.5), ``mean`` (mean of the samples' final
  probabilities x̂_0 >= 0.5), ``first`` (mean of the first step's x̂_0 predictions) or
  ``allsteps`` (mean of every step's x̂_0);
- the person-mask path: one annotator's mask, degraded as in ``refiner_eval.degraded_prior``
  (seeded per case), as it is (``person``) and refined at ``--person-trust``.

HD95 of an empty prediction is the image diagonal (stated in the output). Where the prior
is empty (the segmentor marks nothing), there is nothing to refine and the pipeline's mask
is the segmentor's. Prints means ±
s.e.m., and for each refined row the paired difference from the segmentor (or from the
person's prior) with the fraction of cases improved. ``--split val`` (seeds 800000+) is for
choosing settings; ``--split test`` (seeds 900000+) is for reporting once.

    python benchmarks/refiner_vs_segmentor.py --split val --cases 60 \
        --priors seg segmask:0.7 segmask:0.9 --steps 10 5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from refiner_eval import degraded_prior  # noqa: E402
from train_default import TEST_SEED0, VAL_SEED0, phantom_dataset  # noqa: E402

from napari_berdiff.priors import mask_to_prior  # noqa: E402
from napari_berdiff.refine import load_refiner, refine  # noqa: E402
from napari_berdiff.uncertainty import dice, hd95  # noqa: E402

REFINER = ROOT / "models" / "refiner-phantom-64.safetensors"


def scores(mask: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(Dice, HD95) of ``mask`` against ``target``; HD95 of an empty mask is the diagonal."""
    h = hd95(mask, target)
    if not np.isfinite(h):
        h = float(np.hypot(*target.shape))
    return dice(mask, target), h


#: consensus rules: ``vote`` (frequency of the binary samples >= 0.5), ``mean`` (mean of
#: the samples' final probabilities x̂0 >= 0.5), ``first`` (mean of the first step's x̂0
#: predictions >= 0.5), ``allsteps`` (mean of every step's x̂0 >= 0.5)
RULES = ("vote", "mean", "first", "allsteps")


def run_refiner(refiner, image, prior, **kw) -> dict[str, np.ndarray]:
    """Refine once; the mean x̂0 maps each consensus rule thresholds at 0.5."""
    stream = refine(refiner, image, prior, **kw)
    frames = [f.x0_prob.mean(0) for f in stream]
    res = stream.result
    return {"vote": res.masks.astype(np.float32).mean(0), "mean": res.probs.mean(0),
            "first": frames[0], "allsteps": np.mean(frames, 0)}


def consensus(maps: dict[str, np.ndarray], rule: str, threshold: float = 0.5) -> np.ndarray:
    """The consensus mask of one rule (see ``RULES``), its map thresholded at ``threshold``."""
    return maps[rule] >= threshold


def _named(rule: str, threshold: float) -> str:
    """An arm's name: the rule, with ``@threshold`` unless it is 0.5."""
    return rule if threshold == 0.5 else f"{rule}@{threshold:g}"


def prior_for(spec: str, seg_prob: np.ndarray) -> np.ndarray:
    """The prior map p named by ``spec`` (``seg`` or ``segmask:TRUST``)."""
    if spec == "seg":
        return seg_prob.astype(np.float32)
    if spec.startswith("segmask:"):
        return mask_to_prior(seg_prob > 0.5, float(spec.split(":")[1]))
    raise ValueError(f"unknown prior {spec!r}")


def baseline_mask(model, image: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A baseline's mask: a segmentor's probability > 0.5, or a diffusion model's vote of
    ``n`` samples (frequency >= 0.5)."""
    if model.kind == "segmentor":
        return model.segment(image) > 0.5
    return model.sample_all(image, n=n, seed=seed).masks.astype(np.float32).mean(0) >= 0.5


def evaluate(refiner, segmentor, ds, seed0: int, args,
             baselines: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rows = []
    for i, item in enumerate(ds.items):
        seed = seed0 + i
        ann = np.asarray(item.masks) > 0
        target = ann.mean(0) >= 0.5
        if not target.any():
            continue
        image = item.image_chw[0]
        seg_prob = segmentor.segment(image)
        row: dict[str, Any] = {"seed": seed}
        row["segmentor"] = scores(seg_prob > 0.5, target)
        for th in args.thresholds:
            if th != 0.5:  # the segmentor at the same other thresholds, for fairness
                row[_named("segmentor", th)] = scores(seg_prob >= th, target)
        for name, model in (baselines or {}).items():
            row[f"baseline:{name}"] = scores(baseline_mask(model, image, args.n, seed), target)
        if seg_prob.max() > 0:
            for spec in args.priors:
                p = prior_for(spec, seg_prob)
                if not p.any():  # nothing to refine: the pipeline's mask is the segmentor's
                    for steps in args.steps:
                        for rule in (*RULES, "first+segmentor"):
                            for th in args.thresholds:
                                row[f"{spec}/{steps}/{_named(rule, th)}"] = row["segmentor"]
                    continue
                for steps in args.steps:
                    res = run_refiner(refiner, image, p, n=args.n, steps=steps, seed=seed)
                    for rule in RULES:
                        for th in args.thresholds:
                            row[f"{spec}/{steps}/{_named(rule, th)}"] = scores(
                                consensus(res, rule, th), target)
                    # an ensemble, reported apart: the segmentor's map and the refiner's
                    # first-step mean, averaged
                    both = {"ens": 0.5 * (seg_prob + res["first"])}
                    row[f"{spec}/{steps}/first+segmentor"] = scores(consensus(both, "ens"),
                                                                    target)
        person, _ = degraded_prior(ann, seed)
        if person is not None:
            row["person"] = scores(person, target)
            res = run_refiner(refiner, image, person.astype(np.uint8),
                              trust=args.person_trust, n=args.n, steps=args.steps[0], seed=seed)
            for rule in RULES:
                row[f"person-refined/{rule}"] = scores(consensus(res, rule), target)
        rows.append(row)
    return rows


def _stat(v) -> dict[str, float]:
    a = np.asarray(v, np.float64)
    sem = float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else float("nan")
    return {"mean": float(a.mean()), "sem": sem, "n": int(a.size)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means ± s.e.m. of Dice and HD95 per arm; paired differences from the reference arm
    (the segmentor, or the person's prior for the person-mask rows)."""
    arms = [k for k in rows[0] if k != "seed"]
    arms += [k for r in rows for k in r if k not in arms and k != "seed"]
    out: dict[str, Any] = {}
    for arm in dict.fromkeys(arms):
        ref = "person" if arm.startswith("person-") else "segmentor"
        used = [r for r in rows if arm in r and ref in r]
        entry: dict[str, Any] = {
            "dice": _stat([r[arm][0] for r in used]), "hd95": _stat([r[arm][1] for r in used])}
        if arm not in ("segmentor", "person"):
            dd = [r[arm][0] - r[ref][0] for r in used]
            dh = [r[arm][1] - r[ref][1] for r in used]
            entry.update(reference=ref, dice_diff=_stat(dd), hd95_diff=_stat(dh),
                         dice_improved=float(np.mean([d > 0 for d in dd])),
                         dice_worse=float(np.mean([d < 0 for d in dd])),
                         hd95_improved=float(np.mean([d < 0 for d in dh])))
        out[arm] = entry
    return out


def print_summary(summary: dict[str, Any]) -> None:
    print(f"{'arm':<26} {'Dice':>15} {'HD95 (px)':>14} | {'ΔDice (paired)':>16} "
          f"{'better':>6} {'worse':>6} | {'ΔHD95':>14} {'better':>6}")
    for arm, e in summary.items():
        line = (f"{arm:<26} {e['dice']['mean']:.3f} ± {e['dice']['sem']:.3f} "
                f"{e['hd95']['mean']:6.2f} ± {e['hd95']['sem']:.2f} |")
        if "dice_diff" in e:
            line += (f" {e['dice_diff']['mean']:+.4f} ± {e['dice_diff']['sem']:.4f} "
                     f"{100 * e['dice_improved']:5.0f}% {100 * e['dice_worse']:5.0f}% |"
                     f" {e['hd95_diff']['mean']:+.2f} ± {e['hd95_diff']['sem']:.2f} "
                     f"{100 * e['hd95_improved']:5.0f}%")
        print(line + f"  (n={e['dice']['n']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REFINER))
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--skip", type=int, default=0, help="skip the first cases of the split")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--priors", nargs="*", default=["seg"])
    ap.add_argument("--steps", nargs="+", type=int, default=[10])
    ap.add_argument("--person-trust", type=float, default=0.7)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5],
                    help="thresholds of the consensus maps (and of the segmentor, as extra "
                         "arms named rule@threshold)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--data", default="",
                    help="score --cases items, evenly spaced, of this folder (e.g. the semi-real "
                         "LIDC val64 or test64) instead of the phantoms of --split")
    ap.add_argument("--baselines", nargs="*", default=[],
                    help="model files scored alone (segmentor mask, or vote of N samples)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    refiner, segmentor = load_refiner(args.model, device="cpu")
    if segmentor is None:
        raise SystemExit(f"{args.model} names no segmentor next to it")
    if args.data:
        from napari_berdiff.data.layout import load_dataset

        from napari_berdiff.data.dataset import SegDataset

        full = load_dataset(args.data)
        # evenly spaced over the folder, so that many nodules (not a few nodules' adjacent
        # slices) are scored; --skip shifts the grid
        pick = np.unique(np.linspace(0, len(full) - 1, args.cases).astype(int) + args.skip)
        ds = SegDataset([full[int(i)] for i in pick if i < len(full)], full.description)
        seed0, what = 0, f"items of {args.data} (evenly spaced, skip {args.skip})"
    else:
        seed0 = (TEST_SEED0 if args.split == "test" else VAL_SEED0) + args.skip
        ds = phantom_dataset(seed0, args.cases)
        what = f"{args.split} phantoms"
    t0 = time.perf_counter()
    from napari_berdiff.checkpoints import load_model

    baselines = {Path(b).stem: load_model(b, device="cpu") for b in args.baselines}
    rows = evaluate(refiner, segmentor, ds, seed0, args, baselines)
    secs = time.perf_counter() - t0
    summary = summarise(rows)
    print(f"{args.model}: {len(rows)} {what} with a non-empty majority mask "
          f"(seeds {seed0}..{seed0 + args.cases - 1}), N = {args.n}, {secs:.0f} s; "
          f"HD95 of an empty mask = image diagonal")
    print_summary(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "machine": platform.platform(), "seconds": secs,
             "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
