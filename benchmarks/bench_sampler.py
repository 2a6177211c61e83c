"""Sampler speed: milliseconds per step, sampler overhead and time to first frame.

Prints a table and writes JSON to ``benchmarks/results/bench_sampler.json``. Figures are
medians over ``--repeats`` runs on randomly initialised networks (speed does not depend on
the weights). Not a test: nothing here asserts a time.

    python benchmarks/bench_sampler.py                 # base-32 network and the official preset
    python benchmarks/bench_sampler.py --only base32 --n 16 --size 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel, model_from_preset
from napari_berdiff.networks import build_network, get_network_preset


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def base32_model() -> DiffusionModel:
    """The official BerDiff layout scaled down to 32 base channels."""
    cfg = get_network_preset("berdiff-lidc-128").replace(model_channels=32)
    torch.manual_seed(0)
    return DiffusionModel(build_network(cfg), DiffusionConfig(kind="bernoulli"), {"name": "base32"})


def bench(model: DiffusionModel, n: int, size: int, steps: int, repeats: int) -> dict:
    model.to("auto")
    img = np.random.default_rng(0).random((size, size)).astype(np.float32)
    model.sample_all(img, n=n, steps=1, seed=0)  # warm-up
    runs = []
    for r in range(repeats):
        stream = model.sample(img, n=n, steps=steps, seed=r)
        tic = time.perf_counter()
        first = None
        for frame in stream:
            if first is None:
                first = time.perf_counter() - tic
            frame.states  # the host copy a viewer pulls for display
        res = stream.result
        total = time.perf_counter() - tic
        runs.append((total, res.timings["network_s"], first))
    total = statistics.median(r[0] for r in runs)
    net = statistics.median(r[1] for r in runs)
    first = statistics.median(r[2] for r in runs)
    per_step = total / steps
    return {
        "model": model.name,
        "parameters": model.num_parameters(),
        "device": str(model.device),
        "n": n,
        "size": size,
        "steps": steps,
        "repeats": repeats,
        "ms_per_step": 1000 * per_step,
        "ms_per_sample_step": 1000 * per_step / n,
        "network_ms_per_step": 1000 * net / steps,
        "overhead_pct": 100 * (total - net) / total,
        "first_frame_ms": 1000 * first,
        "first_frame_over_step": first / per_step,
        "total_s": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--official-steps", type=int, default=2)
    ap.add_argument("--official-repeats", type=int, default=2)
    ap.add_argument("--only", choices=["base32", "official"], default=None)
    ap.add_argument("--out", default="benchmarks/results/bench_sampler.json")
    args = ap.parse_args()

    rows = []
    if args.only in (None, "base32"):
        rows.append(bench(base32_model(), args.n, args.size, args.steps, args.repeats))
    if args.only in (None, "official"):
        m = model_from_preset("berdiff-lidc-128")
        rows.append(bench(m, args.n, args.size, args.official_steps, args.official_repeats))

    info = machine()
    print(f"machine: {info}")
    print(f"{'model':<18}{'params':>12}{'N':>4}{'size':>6}{'ms/step':>10}{'ms/smp/step':>13}"
          f"{'overhead':>10}{'1st/step':>10}")
    for r in rows:
        print(f"{r['model']:<18}{r['parameters']:>12,}{r['n']:>4}{r['size']:>6}"
              f"{r['ms_per_step']:>10.0f}{r['ms_per_sample_step']:>13.1f}"
              f"{r['overhead_pct']:>9.2f}%{r['first_frame_over_step']:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
