"""How close masks are to a level set of the phantom's soft lesion; prints a table.

Each phantom annotator thresholds the soft lesion at its own level plus a small jitter, so an
annotation is almost a level set ``soft > τ``. This script fits the best τ (0.05..0.95, step
0.01) to every mask of the clear (not faint) validation phantoms and reports the mean IoU with
that level set, for the annotators, oracle_fresh, the deterministic baseline, the model's
sample-frequency map > 0.5 and the model's samples, plus the spread of the samples' τ::

    .venv/bin/python benchmarks/level_set_fit.py --model models/berdiff-phantom-64.safetensors \\
        --n-val 20 --draw-correlation 0 0.9
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_default import MODELS, NAMES, VAL_SEED0, phantom_dataset  # noqa: E402

from napari_berdiff.checkpoints import load_model  # noqa: E402
from napari_berdiff.data.phantoms import make_phantom, oracle_samples  # noqa: E402

TAUS = np.round(np.arange(0.05, 0.951, 0.01), 2)


def best_level_set(mask: np.ndarray, soft: np.ndarray) -> tuple[float, float]:
    """(IoU, τ) of the level set ``soft > τ`` closest to ``mask`` in IoU."""
    m = mask.astype(bool)
    levels = soft[None] > TAUS[:, None, None]
    inter = (levels & m).sum((1, 2))
    union = (levels | m).sum((1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    i = int(np.argmax(iou))
    return float(iou[i]), float(TAUS[i])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODELS / f"{NAMES['bernoulli']}.safetensors"))
    ap.add_argument("--baseline", default=str(MODELS / f"{NAMES['deterministic']}.safetensors"))
    ap.add_argument("--n-val", type=int, default=20)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--draw-correlation", type=float, nargs="+", default=[0.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    model, baseline = load_model(args.model), load_model(args.baseline)
    ds = phantom_dataset(VAL_SEED0, args.n_val)
    phantoms = [make_phantom(VAL_SEED0 + i, it.image.shape[-1]) for i, it in enumerate(ds.items)]
    clear = [i for i, ph in enumerate(phantoms) if not ph.info["faint"]]
    rows: dict[str, list[float]] = {"annotators": [], "oracle_fresh": [], "deterministic": []}
    for i in clear:
        ph = phantoms[i]
        rows["annotators"] += [best_level_set(m, ph.soft)[0] for m in ph.masks if m.any()]
        fresh = oracle_samples(ph, args.n, np.random.default_rng([i, 11]), fresh=True)
        rows["oracle_fresh"] += [best_level_set(m, ph.soft)[0] for m in fresh if m.any()]
        rows["deterministic"].append(
            best_level_set(baseline.segment(ds.items[i].image) > 0.5, ph.soft)[0])
    print(f"{len(clear)} clear validation phantoms of {args.n_val} (seeds {VAL_SEED0}..), "
          f"N = {args.n}, the model's default steps")
    print("| masks | IoU with its best level set | best τ 10 / 50 / 90 % |")
    print("|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {np.mean(v):.3f} | |")
    for rho in args.draw_correlation:
        freq, samples, taus = [], [], []
        for i in clear:
            res = model.sample_all(ds.items[i].image, n=args.n, seed=i, draw_correlation=rho)
            freq.append(best_level_set(res.masks.mean(0) > 0.5, phantoms[i].soft)[0])
            fits = [best_level_set(m, phantoms[i].soft) for m in res.masks if m.any()]
            samples += [f[0] for f in fits]
            taus += [f[1] for f in fits]
        q = np.percentile(taus, [10, 50, 90])
        print(f"| frequency > 0.5, draw correlation {rho:g} | {np.mean(freq):.3f} | |")
        print(f"| samples, draw correlation {rho:g} | {np.mean(samples):.3f} | "
              f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
