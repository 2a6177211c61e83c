"""Simulated-annotator benchmark of the edit -> refine loop (issue 23, item 3).

Starting from the bundled segmentor's mask of each held-out phantom, a scripted annotator
(:mod:`napari_berdiff.simulated_annotator`) corrects the largest error region against the
annotators' majority mask (frequency >= 0.5) with one round brush stroke of radius <= R
per round. Two arms, paired on the same cases:

- ``edit``: the stroke is the only change.
- ``edit+refine``: after the stroke, the bundled refiner refines the edited mask (prior
  ``trust``, N samples, seed = case seed + round) with every stroke so far as a hard
  constraint (``keep``/``never``), and the consensus (mean probability > 0.5) is accepted
  as the next round's mask.

Prints Dice to the majority mask after 0..5 rounds (mean ± s.e.m.), the rounds needed to
reach the target Dice (capped at ``--max-rounds``; a case that never reaches it counts as
cap + 1), and the paired difference; writes JSON to ``benchmarks/results/``.

    python benchmarks/interactive_refine.py --cases 40 --radius 4 --n 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train_default import TEST_SEED0, VAL_SEED0, phantom_dataset

from napari_berdiff.refine import load_refiner, refine_all
from napari_berdiff.simulated_annotator import apply_stroke, corrective_stroke
from napari_berdiff.uncertainty import dice

ROOT = Path(__file__).resolve().parents[1]
REFINER = ROOT / "models" / "refiner-phantom-64.safetensors"


def run_case(refiner, segmentor, image: np.ndarray, target: np.ndarray, seed: int,
             args: argparse.Namespace) -> dict[str, list[float]]:
    """Dice per round (round 0 = the segmentor's mask) for both arms of one case."""
    start = segmentor.segment(image) > 0.5
    out: dict[str, list[float]] = {}
    for arm in ("edit", "edit+refine"):
        mask = start.copy()
        keep = np.zeros_like(target)
        never = np.zeros_like(target)
        scores = [dice(mask, target)]
        for r in range(1, args.max_rounds + 1):
            if r > 5 and scores[-1] >= args.target:
                break
            stroke = corrective_stroke(mask, target, args.radius)
            if stroke is None:
                scores.append(scores[-1])
                continue
            mask = apply_stroke(mask, stroke)
            disc = stroke.disc(mask.shape)
            (keep if stroke.value else never)[disc] = True
            (never if stroke.value else keep)[disc] = False
            if arm == "edit+refine" and mask.any():
                res = refine_all(refiner, image, mask.astype(np.uint8), trust=args.trust,
                                 n=args.n, seed=seed + r, keep=keep, never=never)
                mask = res.probs.mean(0) > 0.5
            scores.append(dice(mask, target))
        out[arm] = scores
    return out


def rounds_to(scores: list[float], target: float, cap: int) -> int:
    """The first round whose Dice reaches ``target`` (cap + 1 if none does)."""
    for r, d in enumerate(scores):
        if d >= target:
            return r
    return cap + 1


def _stat(v: list[float]) -> dict[str, float]:
    a = np.asarray(v, np.float64)
    sem = float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else float("nan")
    return {"mean": float(a.mean()), "sem": sem, "n": int(a.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--radius", type=float, default=4.0, help="brush radius bound (px)")
    ap.add_argument("--n", type=int, default=8, help="refined samples per round")
    ap.add_argument("--trust", type=float, default=0.7)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--max-rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split", choices=("val", "test"), default="test",
                    help="validation phantoms (seeds 800000+) to choose settings; test "
                         "phantoms (900000+) to report once")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    refiner, segmentor = load_refiner(REFINER, device="cpu")
    seed0 = TEST_SEED0 if args.split == "test" else VAL_SEED0
    ds = phantom_dataset(seed0, args.cases)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, item in enumerate(ds.items):
        seed = seed0 + i
        ann = np.asarray(item.masks) > 0
        target = ann.mean(0) >= 0.5
        if not target.any():
            continue
        scores = run_case(refiner, segmentor, item.image_chw[0], target, seed, args)
        rows.append({"seed": seed, **scores})
    elapsed = time.perf_counter() - t0
    cap = args.max_rounds
    summary: dict[str, Any] = {}
    print(f"{len(rows)} held-out phantoms with a non-empty majority mask ({args.split}, seeds {seed0}+), "
          f"brush radius <= {args.radius:g} px, refine N={args.n}, trust={args.trust}; "
          f"{elapsed:.0f} s")
    print(f"{'round':>5} | {'edit':>15} | {'edit+refine':>15} | {'paired diff':>15}")
    for r in range(6):
        e = [row["edit"][r] for row in rows]
        f = [row["edit+refine"][r] for row in rows]
        d = [b - a for a, b in zip(e, f)]
        se, sf, sd = _stat(e), _stat(f), _stat(d)
        summary[f"round_{r}"] = {"edit": se, "edit+refine": sf, "diff": sd}
        print(f"{r:>5} | {se['mean']:.3f} ± {se['sem']:.3f}   | {sf['mean']:.3f} ± "
              f"{sf['sem']:.3f}   | {sd['mean']:+.3f} ± {sd['sem']:.3f}")
    re = [rounds_to(row["edit"], args.target, cap) for row in rows]
    rf = [rounds_to(row["edit+refine"], args.target, cap) for row in rows]
    rd = [b - a for a, b in zip(re, rf)]
    summary["rounds_to_target"] = {"edit": _stat(re), "edit+refine": _stat(rf),
                                   "diff": _stat(rd),
                                   "fewer": int(sum(x < 0 for x in rd)),
                                   "more": int(sum(x > 0 for x in rd)),
                                   "never_reached": {"edit": int(sum(x > cap for x in re)),
                                                     "edit+refine": int(sum(x > cap for x in rf))},
                                   "median": {"edit": float(np.median(re)),
                                              "edit+refine": float(np.median(rf))}}
    s = summary["rounds_to_target"]
    print(f"rounds to Dice {args.target}: edit {s['edit']['mean']:.2f} ± {s['edit']['sem']:.2f} "
          f"(median {s['median']['edit']:g}), edit+refine {s['edit+refine']['mean']:.2f} ± "
          f"{s['edit+refine']['sem']:.2f} (median {s['median']['edit+refine']:g}); paired "
          f"{s['diff']['mean']:+.2f} ± {s['diff']['sem']:.2f}; fewer in {s['fewer']}, more in "
          f"{s['more']} of {len(rows)}; never within {cap}: {s['never_reached']}")
    out = ROOT / "benchmarks" / "results" / f"interactive_refine_{args.split}_t{args.trust:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                               "torch_threads": torch.get_num_threads(), "seconds": elapsed,
                               "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
