"""Peak memory of a sampling run by N and image size, with and without chunking.

Each configuration runs in a fresh Python process: it imports, loads the model, reads its
RSS high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) as the baseline, samples
once, and reports the high-water mark's growth. So each figure is the extra resident memory
one run needs on top of the loaded model, with nothing left over from another run.

Chunking modes: ``none`` (the whole batch at once, ``memory_budget_mb=None``), ``budget``
(the sampler's default memory budget, which picks the chunk with ``choose_chunk``) and
``maxK`` (``max_batch=K``). The estimate is the sampler's peak-memory plan of every stage
(``plan_memory``); configurations it refuses, or whose estimate exceeds ``--max-gb``, are
skipped rather than risk exhausting the machine's RAM; the table says so.
Peak memory depends on the chunk, not on the step count, so runs use ``--steps 1`` by default.

    python benchmarks/bench_memory.py                                   # bundled model
    python benchmarks/bench_memory.py --n 16 --sizes 512 --modes budget max4 --net base32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from _common import (base_parser, describe, load_bench_model, machine, print_table,
                     set_threads, test_image, write_json)

COLUMNS = [("n", "N", "d"), ("size", "size", "d"), ("mode", "chunking", ""),
           ("chunk", "chunk", "d"), ("estimate_mb", "estimate MB", ".0f"),
           ("peak_mb", "peak MB", ".0f"), ("baseline_mb", "baseline MB", ".0f"),
           ("seconds", "run s", ".1f"), ("note", "note", "")]


def maxrss_mb() -> float:
    """This process's resident-set high-water mark in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chunk_kwargs(mode: str) -> dict[str, Any]:
    """The sampler arguments of a chunking mode."""
    if mode == "none":
        return {"memory_budget_mb": None}
    if mode == "budget":
        return {}
    if mode.startswith("max"):
        return {"max_batch": int(mode[3:])}
    raise ValueError(f"unknown chunking mode {mode!r}")


def estimate(model: Any, n: int, size: int, mode: str) -> tuple[int, float, str]:
    """The chunk the sampler would use, its estimated peak memory of every stage in MiB
    (``plan_memory``: image, image encoder, the N samples' state, the network), and a note
    when the plan refuses the run."""
    from napari_berdiff.diffusion.sampler import (DEFAULT_MEMORY_BUDGET_MB, MemoryBudgetError,
                                                  plan_memory)

    kw = chunk_kwargs(mode)
    try:
        plan = plan_memory(model.net, n, model.network_channels, size, size,
                           kw.get("max_batch"),
                           kw.get("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB), model.device)
    except MemoryBudgetError:
        return 0, float("nan"), "refused by the memory plan"
    return plan.chunk, plan.total / 2**20, ""


def child(net: str, n: int, size: int, mode: str, steps: int, threads: int | None) -> None:
    """Measure one configuration in this (fresh) process and print its JSON."""
    set_threads(threads)
    model = load_bench_model(net)
    image = test_image(size)
    base = maxrss_mb()
    tic = time.perf_counter()
    res = model.sample_all(image, n=n, steps=steps, seed=0, **chunk_kwargs(mode))
    sec = time.perf_counter() - tic
    print(json.dumps({"baseline_mb": base, "peak_mb": maxrss_mb() - base, "seconds": sec,
                      "chunk": res.chunk_size}))


def run_child(args: Any, n: int, size: int, mode: str) -> dict[str, Any]:
    """Run :func:`child` in a subprocess and parse its result."""
    cmd = [sys.executable, __file__, "--child", "--net", args.net, "--n", str(n),
           "--sizes", str(size), "--modes", mode, "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"note": f"failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = base_parser(__doc__, "bench_memory", repeats=None)
    ap.add_argument("--net", default="bundled", help="bundled, base32, lidc or a path")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--modes", nargs="+", default=["none", "budget"])
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=8.0,
                    help="skip configurations estimated above this")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.net, args.n[0], args.sizes[0], args.modes[0], args.steps, args.threads)
        return

    set_threads(args.threads)
    info = machine()
    print(describe(info))
    model = load_bench_model(args.net)
    rows = []
    for size in args.sizes:
        for n in args.n:
            for mode in args.modes:
                chunk, est, note = estimate(model, n, size, mode)
                row = {"net": model.name, "n": n, "size": size, "mode": mode, "chunk": chunk,
                       "estimate_mb": est, "steps": args.steps, "note": note}
                if note:
                    pass
                elif est > args.max_gb * 1024:
                    row["note"] = f"skipped: estimate above {args.max_gb} GB"
                else:
                    row |= run_child(args, n, size, mode)
                rows.append(row)
                print_table([row], COLUMNS)
    print(f"\nsummary ({model.name}, peak = RSS high-water mark above the loaded model):")
    print_table(rows, COLUMNS)
    write_json(args.name, {"net": model.name, "results": rows}, info)


if __name__ == "__main__":
    main()
