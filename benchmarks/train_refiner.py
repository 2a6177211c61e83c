"""The exact recipe behind the bundled mask refiner in ``models/``; prints its figures.

    .venv/bin/python benchmarks/train_refiner.py train \
        --out /tmp/s2/refiner/refiner-phantom-64.safetensors
    cp /tmp/s2/refiner/refiner-phantom-64{,-segmentor}.safetensors models/
    .venv/bin/python benchmarks/train_refiner.py evaluate --card   # held-out phantoms

The feature-conditioned candidate of issue 23 (``BENCHMARKS.md``; not bundled)::

    train_refiner.py train --out R1 --features --feature-grad 0.1 --init-from \
        models/refiner-phantom-64.safetensors --prior-mix 0.65 --lr 5e-4 --warmup 50 --steps 2600
    train_refiner.py train --out R2 --features --feature-grad 0.1 --refiner-dice 1.0 \
        --init-from R1 --prior-mix 0.65 --lr 3e-4 --warmup 20 --steps 1300 --minutes 14
    benchmarks/refiner_vs_segmentor.py --model R2 --split val --priors seg segmask:0.9 --steps 1 10

``train`` runs :func:`napari_berdiff.training.refiner.train_refiner` (alternate-collaborative
HiDiff-style training of a segmentor and a prior-conditioned Bernoulli refiner) on the
phantoms of :mod:`napari_berdiff.data.phantoms` at 64×64 (the training seeds of
``benchmarks/train_default.py``), one torch thread. It writes the refiner and, next to it,
``<name>-segmentor.safetensors``.

``evaluate`` scores the pair on held-out phantoms (seeds 900000+, as train_default.py) with
two kinds of prior:

* a **degraded prior**: one annotator's mask (drawn by a seeded generator among the
  annotators who marked the lesion) passed through
  :func:`napari_berdiff.priors.degrade_mask` with a per-case seed, softened with
  ``mask_to_prior(trust)``;
* the **segmentor's prior**: its probability map, used as p directly.

Dice is measured against each of the K = 4 annotators and averaged over them (an empty
mask against an empty annotation scores 1); HD95 likewise, over the annotators for which it
is defined (both masks non-empty). ``--card`` stores the figures in the refiner's metadata
and writes ``models/refiner-phantom-64.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_default import MODELS, SIZE, TRAIN_SEED0, phantom_dataset  # noqa: E402

from napari_berdiff.networks import CondOnceConfig, network_description  # noqa: E402
from napari_berdiff.training import TrainConfig, default_diffusion, train  # noqa: E402

NAME = "refiner-phantom-64"


def refiner_network() -> dict:
    """The refiner: a condition-once network (image + prior encoded once per call, width 24,
    one block per level; the per-step denoiser base 16, 2 res blocks, at half resolution)."""
    return network_description(CondOnceConfig(
        image_size=SIZE, image_channels=2, model_channels=16, channel_mult=(1, 2, 2),
        num_res_blocks=2, encoder_channels=24, encoder_blocks=1, unshuffle=2))


def segmentor_network() -> dict:
    """The segmentor: the smallest condition-once network (base 16, one block per level),
    used at t = 0 with an all-zero mask."""
    return network_description(CondOnceConfig(
        image_size=SIZE, image_channels=1, model_channels=16, channel_mult=(1, 2, 2),
        num_res_blocks=1, encoder_channels=16, encoder_blocks=1, unshuffle=2))


def recipe(steps: int, minutes: float, batch: int, *, features: bool = False,
           feature_grad: float = 0.0, init_from: str = "", prior_mix: float = 0.5,
           lr: float = 1e-3, warmup: int = 100, refiner_dice: float = 0.0) -> TrainConfig:
    """The bundled refiner's recipe (T = 10, ᾱ linear, x0-prediction, 10 steps).

    ``features``: the refiner is also conditioned on the segmentor's multi-scale decoder
    features (HiDiff); ``feature_grad``: the weight with which its loss also trains the
    segmentor; ``init_from``: a refiner file (and its segmentor) that starts the run."""
    net = refiner_network()
    if features:
        net = {**net, "segmentor": segmentor_network()}
    return TrainConfig(kind="refiner", network=net,
                       segmentor_network=segmentor_network(),
                       segmentor_feature_grad=feature_grad, init_from=init_from,
                       refiner_dice_weight=refiner_dice,
                       diffusion=default_diffusion("refiner").to_dict(), steps=steps,
                       batch_size=batch, lr=lr, warmup=warmup, min_lr_ratio=0.05,
                       ema_decay=0.999, grad_clip=1.0, augment=True, checkpoint_every=100,
                       max_minutes=minutes, seed=0, threads=1, prior_mix=prior_mix,
                       trust_range=(0.3, 0.95), degrade_strength=1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=2200)
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--minutes", type=float, default=37)
    t.add_argument("--n-train", type=int, default=3000)
    t.add_argument("--data", default="",
                   help="train on this folder of 64x64 items (LIDC-crops or images/ + masks/ "
                        "layout, every item) instead of the phantoms")
    t.add_argument("--name", default=NAME, help="the model name stored in the files")
    t.add_argument("--out", default=str(MODELS / f"{NAME}.safetensors"))
    t.add_argument("--resume", action="store_true")
    t.add_argument("--features", action="store_true",
                   help="condition the refiner on the segmentor's multi-scale features")
    t.add_argument("--feature-grad", type=float, default=0.0,
                   help="weight of the refiner's loss on the segmentor (via its features)")
    t.add_argument("--init-from", default="", help="a refiner file whose pair starts the run")
    t.add_argument("--prior-mix", type=float, default=0.5)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--refiner-dice", type=float, default=0.0,
                   help="weight of a soft-Dice term on the refiner's x̂0")
    e = sub.add_parser("evaluate")
    e.add_argument("--model", default=str(MODELS / f"{NAME}.safetensors"))
    e.add_argument("--n-test", type=int, default=100)
    e.add_argument("--n", type=int, default=8, help="refined samples per case")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--trust", type=float, default=0.7)
    e.add_argument("--card", action="store_true",
                   help="store the figures in the refiner's metadata and write its card")
    e.add_argument("--json", default=None, help="write the per-case figures to this file")
    e.add_argument("--note", default="", help="a sentence added to the card's recipe section")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd != "train":
        from refiner_eval import run_evaluation

        return run_evaluation(args, NAME)
    tic = time.perf_counter()
    if args.data:
        from napari_berdiff.data.layout import load_dataset

        ds = load_dataset(args.data)
        print(f"{len(ds)} training items of {args.data} read in "
              f"{time.perf_counter() - tic:.1f} s", flush=True)
    else:
        ds = phantom_dataset(TRAIN_SEED0, args.n_train)
        print(f"{len(ds)} training phantoms made in {time.perf_counter() - tic:.1f} s",
              flush=True)
    out = Path(args.out)
    cfg = recipe(args.steps, args.minutes, args.batch, features=args.features,
                 feature_grad=args.feature_grad, init_from=args.init_from,
                 prior_mix=args.prior_mix, lr=args.lr, warmup=args.warmup,
                 refiner_dice=args.refiner_dice)
    res = train(cfg, ds, out, resume=args.resume, name=args.name, progress=False)
    print(json.dumps({"steps": res.step, "train_time_s": round(res.elapsed_s, 1),
                      "stopped_by_time": res.stopped_by_time,
                      "final_loss_mean_last100": float(np.mean(res.losses[-100:])),
                      "out": str(out), "segmentor": str(res.extra["segmentor"])}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
