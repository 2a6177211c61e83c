"""Torch threads against competing load: the evidence for the ``auto`` thread policy.

For each competing load (0, 1 or 2 busy-looping processes) and each thread setting (1..N
and ``auto``, which measures the load itself right before the run), the median wall time
of ``--repeats`` sampling runs of the bundled default (16 samples of 128², its default
steps), and the ratio to the best setting at that load (1.00 = the best of the row).

    python benchmarks/bench_threads.py --repeats 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import numpy as np

from _common import BUNDLED, describe, machine, median, write_json

from napari_berdiff import load_model
from napari_berdiff.threads import available_cores, use_threads


def _busy(stop) -> None:  # pragma: no cover - runs in a child process
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _time_run(model, image: np.ndarray, n: int, threads: str, repeats: int
              ) -> tuple[float, int]:
    times, used = [], 0
    for r in range(repeats):
        tic = time.perf_counter()
        used = use_threads(threads)
        model.sample_all(image, n=n, seed=r)
        times.append(time.perf_counter() - tic)
    return median(times), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--loads", default="0,1,2", help="competing busy processes to try")
    args = ap.parse_args()
    model = load_model(BUNDLED, device="cpu")
    image = np.random.default_rng(0).random((args.size, args.size)).astype(np.float32)
    model.sample_all(image, n=args.n, seed=0)  # warm-up
    settings = [str(t) for t in range(1, (os.cpu_count() or 1) + 1)] + ["auto"]
    info = machine("cpu")
    print(describe(info))
    print(f"{args.n} samples of {args.size}² at the default's steps; median of {args.repeats}; "
          f"{available_cores()} available core(s)")
    print(f"{'busy procs':>10} | " + " | ".join(f"{s:>14}" for s in settings))
    rows = []
    for load in (int(v) for v in args.loads.split(",")):
        stop = mp.Event()
        procs = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(load)]
        for p in procs:
            p.start()
        time.sleep(1.0 if load else 0.0)
        try:
            res = {s: _time_run(model, image, args.n, s, args.repeats) for s in settings}
        finally:
            stop.set()
            for p in procs:
                p.join(5)
        best = min(t for t, _ in res.values())
        cells = [f"{t:5.2f}s {t / best:4.2f}x" + (f"({u})" if s == "auto" else "")
                 for s, (t, u) in res.items()]
        print(f"{load:>10} | " + " | ".join(f"{c:>14}" for c in cells))
        rows.append({"busy_processes": load,
                     "seconds": {s: t for s, (t, _) in res.items()},
                     "auto_threads": res["auto"][1],
                     "ratio_to_best": {s: t / best for s, (t, _) in res.items()}})
    write_json("bench_threads", {"args": vars(args), "rows": rows}, info)


if __name__ == "__main__":
    main()
