"""Train the official BerDiff network layout (the ``berdiff-lidc-128`` preset: 85.6 M
parameters) on the semi-real LIDC at 64², so the inference backends can be judged on trained
weights rather than random ones (issue 26, item 2). The official weights are not available
offline; these are ours, trained briefly, and only stand in for their numerics.

    python benchmarks/train_official_layout.py --data D/train64 -o OUT.safetensors --minutes 60
    python benchmarks/train_official_layout.py --data D/train64 -o OUT.safetensors --resume

The recipe is the preset's (Bernoulli diffusion, ε prediction, cosine schedule, 1000 steps,
``ddimuni10`` sampling) with the images as stored (the lung window, in [0, 1]).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_berdiff.data.layout import load_dataset  # noqa: E402
from napari_berdiff.model_presets import get_model_preset  # noqa: E402
from napari_berdiff.networks import network_description  # noqa: E402
from napari_berdiff.networks.presets import NETWORK_PRESETS  # noqa: E402
from napari_berdiff.training import TrainConfig, train  # noqa: E402

PRESET = "berdiff-lidc-128"


def recipe(size: int, steps: int, batch: int, lr: float, minutes: float, threads: int
           ) -> TrainConfig:
    """The preset's network at ``size``² and its diffusion, as a training recipe."""
    net = dataclasses.replace(NETWORK_PRESETS[PRESET], image_size=size)
    diff = get_model_preset(PRESET).diffusion
    return TrainConfig(kind="bernoulli", network=network_description(net),
                       diffusion=dataclasses.asdict(diff), steps=steps, batch_size=batch,
                       lr=lr, warmup=50, normalisation="none", checkpoint_every=25,
                       max_minutes=minutes, threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a 64² LIDC-layout folder (lidc_half_res)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    data = load_dataset(args.data)
    size = int(data[0].image.shape[-1])
    cfg = recipe(size, args.steps, args.batch_size, args.lr, args.minutes, args.threads)
    result = train(cfg, data, args.output, resume=args.resume, name=f"{PRESET}-semireal-{size}")
    print(result)


if __name__ == "__main__":
    main()
