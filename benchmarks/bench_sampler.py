"""Sampler speed: ms per step by N, image size and network; overhead; time to first frame.

For every (network, N, size) it runs the streaming sampler ``--repeats`` times on a phantom
image, reads every frame's binary states (the host copy a viewer pulls) and reports medians
of:

* ``ms/step``: the median time between two consecutive frames (one reverse step);
* ``ms/smp/step``: the same divided by N;
* ``net ms/step``: the network's forward time per step (``SampleResult.timings``);
* ``overhead``: ``(total − network) / total``, the sampler's own cost;
* ``1st frame`` and ``1st/step``: time from the call to the first frame (image encode,
  initial state and one step), and its ratio to one step.

With ``--quality K``, trained models also get GED² and HM-IoU of N = 16 samples on K
held-out phantoms (64×64, seeds 900000…), at the same step count, next to their speed.
Not a test: nothing here asserts a time. Writes ``benchmarks/results/<--name>.json``.

    python benchmarks/bench_sampler.py                                # bundled model, grid
    python benchmarks/bench_sampler.py --nets bundled base32 --n 16 --sizes 128
    python benchmarks/bench_sampler.py --model models/other.safetensors --quality 20
    python benchmarks/bench_sampler.py --lidc --n 1 --sizes 128 --steps 2 --repeats 2
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from _common import (base_parser, describe, is_trained, load_bench_model, machine, median,
                     median_of, print_table, quality, set_threads, test_image, write_json)

COLUMNS = [("model", "model", ""), ("n", "N", "d"), ("size", "size", "d"),
           ("ms_per_step", "ms/step", ".1f"), ("ms_per_sample_step", "ms/smp/step", ".2f"),
           ("network_ms_per_step", "net ms/step", ".1f"), ("overhead_pct", "overhead %", ".2f"),
           ("first_frame_ms", "1st frame ms", ".1f"), ("first_over_step", "1st/step", ".2f"),
           ("ged2", "GED²", ".3f"), ("hm_iou", "HM-IoU", ".3f")]


def one_run(model: Any, image: np.ndarray, n: int, steps: int, seed: int,
            **sample_kw: Any) -> dict[str, float]:
    """Stream one run to the end; its total, network, overhead, first-frame and step times."""
    stream = model.sample(image, n=n, steps=steps, seed=seed, **sample_kw)
    stamps = []
    for frame in stream:
        frame.states  # noqa: B018 - the host copy a viewer pulls
        stamps.append(time.perf_counter())
    tim = stream.result.timings
    gaps = np.diff(stamps)
    return {"total_s": tim["total_s"], "network_s": tim["network_s"],
            "overhead_s": tim["overhead_s"], "first_frame_s": tim["first_frame_s"],
            "step_s": float(np.median(gaps)) if len(gaps) else tim["first_frame_s"]}


def bench(model: Any, n: int, size: int, steps: int, repeats: int,
          **sample_kw: Any) -> dict[str, Any]:
    """Median figures of ``repeats`` runs (after a one-step warm-up) for one configuration."""
    image = test_image(size)
    model.sample_all(image, n=n, steps=1, seed=0, **sample_kw)  # warm-up
    runs = [one_run(model, image, n, steps, seed, **sample_kw) for seed in range(repeats)]
    m = median_of(runs)
    step = m["step_s"]
    return {
        "model": model.name, "parameters": model.num_parameters(), "n": n, "size": size,
        "steps": steps, "repeats": repeats,
        "ms_per_step": 1000 * step, "ms_per_sample_step": 1000 * step / n,
        "network_ms_per_step": 1000 * m["network_s"] / steps,
        "overhead_pct": 100 * median(r["overhead_s"] / r["total_s"] for r in runs),
        "first_frame_ms": 1000 * m["first_frame_s"], "first_over_step": m["first_frame_s"] / step,
        "total_s": m["total_s"], "runs": runs,
    }


def main() -> None:
    ap = base_parser(__doc__, "bench_sampler")
    ap.add_argument("--nets", nargs="+", default=["bundled"],
                    help="bundled, base32 (random base-32 UNet) or .safetensors paths")
    ap.add_argument("--model", action="append", default=[], help="another .safetensors")
    ap.add_argument("--lidc", action="store_true",
                    help="also the berdiff-lidc-128 preset (slow: ~1.35 s/sample/step)")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quality", type=int, default=0, metavar="K",
                    help="GED²/HM-IoU on K held-out phantoms for trained models")
    args = ap.parse_args()
    set_threads(args.threads)

    specs = list(args.nets) + list(args.model) + (["lidc"] if args.lidc else [])
    info = machine()
    print(describe(info))
    rows = []
    for spec in specs:
        model = load_bench_model(spec)
        q = quality(model, args.quality, steps=args.steps) if args.quality and is_trained(spec) \
            else {}
        for size in args.sizes:
            for n in args.n:
                row = bench(model, n, size, args.steps, args.repeats) | q
                rows.append(row)
                print_table([row], COLUMNS)
    print("\nsummary (medians):")
    print_table(rows, COLUMNS)
    write_json(args.name, {"steps": args.steps, "results": rows}, info)


if __name__ == "__main__":
    main()
