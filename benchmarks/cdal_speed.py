"""Speed probe for cDAL generator configurations on the LIDC grid (issue 22); prints figures.

    OMP_NUM_THREADS=1 python benchmarks/cdal_speed.py [--repeats 5] [--threads 1 auto]

Each configuration is an NCSN++ generator with random weights (the time does not depend on
them) for 64×64 images, the grid of the LIDC models (1 mm; a 128×128 crop at 0.5 mm is
resampled to it). It times 16 samples × the model's steps (T = 2) through the real streaming
sampler (``DiffusionModel.sample_all``), median of ``--repeats`` after one warm-up, next to the
bundled BerDiff LIDC default at its own default steps in the same process, and prints each
time and its ratio to the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_berdiff.networks import NCSNppConfig, NCSNppGenerator  # noqa: E402

DEFAULT = ROOT / "models" / "berdiff-lidc-semireal-64.safetensors"
SIZE = 64

#: name → NCSN++ changes from the small cDAL generator (nf 32, ch_mult (1, 2, 2), 1 block).
CONFIGS: dict[str, dict] = {
    "u1 nf32 (1,2,2) attn16": dict(unshuffle=1, ch_mult=(1, 2, 2), attn_resolutions=(16,)),
    "u2 nf32 (1,2,2) attn8": dict(unshuffle=2, ch_mult=(1, 2, 2), attn_resolutions=(8,)),
    "u2 nf32 (1,2,2) no attn": dict(unshuffle=2, ch_mult=(1, 2, 2), attn_resolutions=()),
    "u2 nf32 (1,2) attn16": dict(unshuffle=2, ch_mult=(1, 2), attn_resolutions=(16,)),
    "u2 nf32 (1,2,2,2) attn8": dict(unshuffle=2, ch_mult=(1, 2, 2, 2), attn_resolutions=(8,)),
    "u2 nf64 (1,2,2) attn8": dict(unshuffle=2, nf=64, ch_mult=(1, 2, 2), attn_resolutions=(8,)),
    "u4 nf64 (1,2,2) attn4": dict(unshuffle=4, nf=64, ch_mult=(1, 2, 2), attn_resolutions=(4,)),
    "u4 nf32 (1,2,2) attn4": dict(unshuffle=4, ch_mult=(1, 2, 2), attn_resolutions=(4,)),
    "u4 nf32 (1,2,2) 2 blocks attn8": dict(unshuffle=4, ch_mult=(1, 2, 2), num_res_blocks=2,
                                           attn_resolutions=(8,)),
    "u4 nf32 (1,2,2,2) 2 blocks attn8": dict(unshuffle=4, ch_mult=(1, 2, 2, 2),
                                             num_res_blocks=2, attn_resolutions=(8,)),
}


def cdal_model(changes: dict):
    """A random-weight cDAL model of the given generator configuration at 64×64."""
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.training import default_diffusion
    from napari_berdiff.training.config import cdal_network

    torch.manual_seed(0)
    cfg: NCSNppConfig = cdal_network(SIZE, 1).replace(**changes)
    net = NCSNppGenerator(cfg)
    return DiffusionModel(net, default_diffusion("cdal")), sum(p.numel() for p in net.parameters())


def median_time(model, image: np.ndarray, repeats: int) -> float:
    """Median seconds for 16 samples at the model's default steps (one warm-up first)."""
    model.sample_all(image, n=16, seed=0)
    times = []
    for r in range(repeats):
        tic = time.perf_counter()
        model.sample_all(image, n=16, seed=r + 1)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.threads import resolve_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", nargs="+", default=["1", "auto"])
    ap.add_argument("--only", nargs="*", help="configuration names to time (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    image = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    default = load_model(DEFAULT)
    rows = []
    for threads in args.threads:
        n_threads = resolve_threads(threads)
        torch.set_num_threads(n_threads)
        ref = median_time(default, image, args.repeats)
        print(f"threads {threads} ({n_threads}): BerDiff LIDC default "
              f"({default.diffusion.default_step_count} steps) {ref:.3f} s", flush=True)
        for name, changes in CONFIGS.items():
            if args.only and name not in args.only:
                continue
            model, n_par = cdal_model(changes)
            secs = median_time(model, image, args.repeats)
            rows.append({"threads": threads, "config": name, "params": n_par, "s": secs,
                         "ratio_to_default": secs / ref, "default_s": ref})
            print(f"  {name:28s} {n_par / 1e6:5.2f} M params  {secs:.3f} s  "
                  f"{secs / ref:.2f}x the default", flush=True)
    print(f"16 samples of {SIZE}x{SIZE}, median of {args.repeats}; load average "
          f"{os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
