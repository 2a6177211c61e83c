"""Inference backends side by side: the official loop, and our sampler on eager, jit,
onnxruntime and bf16, on the same berdiff-lidc-128 network (issue 26, item 2).

For each image size, every method samples N masks with the same visited steps
(``ddimuni10``) from the same network, interleaved run by run in one process (the order
reversed on odd repeats); each figure is the median over the repeats, and each ratio is the
official loop's median over the method's. The official loop is
``bench_official_loop.official_style_loop`` (N chains of batch 1, NCHW, eager). Our methods
all run ``model.sample_all`` with seed 0, so their final ``x̂0`` maps are compared with
eager's: max |Δ x̂0| and the fraction of mask pixels (``x̂0 > 0.5``) that differ.

The preset's zero-initialised output layers make a random network's output a constant 0.5
(so x̂0 would be 0.5 everywhere and every comparison trivially equal); those tensors are
therefore filled with N(0, 0.02²) noise, seeded, for every method alike. The masks of such
a network hover around 0.5 (x̂0's spread is about 0.1), so the mask-change fraction is a
pessimistic figure for a trained network whose x̂0 is mostly near 0 or 1. Each backend's
graph is built before timing (a one-step run of the same batch shapes); its build seconds
are reported apart.

``--bundled`` adds our default network (models/berdiff-phantom-64.safetensors) at 128²,
N samples at its default steps, with our methods only.

``--weights FILE`` replaces the random weights by trained ones in the same layout
(``benchmarks/train_official_layout.py``); ``--lidc-quality K --lidc-data D/val64`` then
scores those weights on each backend on K validation slices (GED² and HM-IoU against the
readers, paired with eager by slice), which is what a reduced-precision backend is judged by.

    python benchmarks/bench_backends.py --threads 1 --sizes 64 128 --repeats 2
    python benchmarks/bench_backends.py --threads 2 --sizes 64 --methods eager openvino-bf16 \
        bf16 --weights W.safetensors --lidc-quality 40 --lidc-data D/val64 --n 8
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from _common import (base_parser, describe, load_bench_model, machine, median, print_table,
                     quality, set_threads, test_image, write_json)
from bench_official_loop import STEPS, SpacedSchedule, official_style_loop

COLUMNS = [("size", "size", "d"), ("method", "method", ""), ("seconds", "run s", ".2f"),
           ("ms_per_sample_step", "ms/smp/step", ".1f"), ("ratio", "speed-up", ".3f"),
           ("build_s", "build s", ".1f"), ("max_dx0", "max|Δx̂0|", ".1e"),
           ("mask_changed", "mask px changed", ".2e")]
OURS = ("eager", "jit", "onnxruntime", "openvino", "openvino-bf16", "bf16")


def randomise_zero_layers(net: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill the network's all-zero weight tensors (the zero-initialised output layers) with
    seeded N(0, std²) noise, so that a random network's output is not a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def our_method(model: Any, backend: str, image: np.ndarray, n: int, steps: Any) -> dict:
    """A runner of ``model.sample_all`` on ``backend`` (its own copy of the model's
    wrapper), with its graphs built by a one-step run first; returns the runner and the
    build seconds."""
    wrapped = copy.copy(model).use_backend(backend)
    tic = time.perf_counter()
    wrapped.sample_all(image, n=n, steps=1, seed=0)  # builds every chunk's graph
    build = time.perf_counter() - tic
    return {"fn": lambda: wrapped.sample_all(image, n=n, steps=steps, seed=0), "build_s": build}


def measure(methods: dict[str, dict], repeats: int, label: str) -> dict[str, dict]:
    """Interleaved timed runs of each method; keeps each method's last result."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    results: dict[str, Any] = {}
    for r in range(repeats):
        order = list(methods.items())
        for name, m in (order if r % 2 == 0 else order[::-1]):
            tic = time.perf_counter()
            results[name] = m["fn"]()
            times[name].append(time.perf_counter() - tic)
            print(f"{label} run {r}: {name}: {times[name][-1]:.2f} s", flush=True)
    return {k: {"runs": v, "seconds": median(v), "result": results[k]} for k, v in times.items()}


def rows_for(size: int, n: int, n_steps: int, timed: dict[str, dict], methods: dict,
             reference: str | None) -> list[dict]:
    """Table rows: median seconds, ratio to ``reference`` (None: to eager), fidelity."""
    ref_s = timed[reference or "eager"]["seconds"]
    eager = timed["eager"]["result"]
    rows = []
    for name, t in timed.items():
        row = {"size": size, "method": name, "n": n, "seconds": t["seconds"], "runs": t["runs"],
               "ms_per_sample_step": 1000 * t["seconds"] / (n * n_steps),
               "ratio": ref_s / t["seconds"], "build_s": methods[name].get("build_s")}
        res = t["result"]
        if hasattr(res, "probs"):
            row["max_dx0"] = float(np.abs(res.probs - eager.probs).max())
            row["mask_changed"] = float((res.masks != eager.masks).mean())
        rows.append(row)
    return rows


def lidc_quality(model: Any, backends: list[str], data: str, k: int, n: int) -> list[dict]:
    """GED² and HM-IoU of ``model`` on each backend: ``n`` samples of the first ``k`` slices
    of a LIDC-layout folder (seed 0, the same per slice for every backend), with the
    difference from eager paired by slice and the share of mask pixels that differ."""
    from napari_berdiff.data.layout import load_dataset
    from napari_berdiff.training.evaluate import evaluate

    items = load_dataset(data)[:k]
    per, masks = {}, {}
    for b in ["eager"] + [b for b in backends if b != "eager"]:
        wrapped = copy.copy(model).use_backend(b)
        tic = time.perf_counter()
        rep = evaluate(wrapped, items, n=n, steps=STEPS, seed=0, baseline=None, oracle=False,
                       annotators=False)
        per[b] = {m: np.asarray(rep.per_item["model"][m]) for m in ("ged2", "hm_iou")}
        masks[b] = [wrapped.sample_all(it.image, n=n, steps=STEPS, seed=i).masks
                    for i, it in enumerate(items[:4])]
        print(f"LIDC {k} slices, {b}: {time.perf_counter() - tic:.0f} s", flush=True)
    rows = []
    for b, m in per.items():
        d = m["ged2"] - per["eager"]["ged2"]
        changed = np.mean([(x != y).mean() for x, y in zip(masks[b], masks["eager"])])
        row = {"method": f"LIDC quality {b}", "ged2": float(m["ged2"].mean()),
               "ged2_sem": float(m["ged2"].std(ddof=1) / np.sqrt(len(d))),
               "hm_iou": float(m["hm_iou"].mean()), "ged2_minus_eager": float(d.mean()),
               "ged2_minus_eager_sem": float(d.std(ddof=1) / np.sqrt(len(d))),
               "mask_changed": float(changed)}
        rows.append(row)
        print(f"{b}: GED² {row['ged2']:.4f} ± {row['ged2_sem']:.4f}, HM-IoU {row['hm_iou']:.4f};"
              f" minus eager's {row['ged2_minus_eager']:+.4f} ± "
              f"{row['ged2_minus_eager_sem']:.4f} (paired); mask px changed {changed:.2e} "
              "(first 4 slices)", flush=True)
    return rows


def main() -> None:
    ap = base_parser(__doc__, "bench_backends", repeats=2)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 128],
                    help="image sizes for the berdiff-lidc-128 network (none: skip it)")
    ap.add_argument("--methods", nargs="+", default=list(OURS), choices=OURS,
                    help="our backends to run (the official loop always runs)")
    ap.add_argument("--bundled", action="store_true",
                    help="also time our default model at 128² (our methods only)")
    ap.add_argument("--quality", type=int, default=0, metavar="K",
                    help="with --bundled: GED² and HM-IoU of the default model on each "
                         "backend, N samples on K held-out phantoms (64², seed 0)")
    ap.add_argument("--weights", default=None, metavar="FILE",
                    help="trained weights in the berdiff-lidc-128 layout (a .safetensors "
                         "from train_official_layout.py) instead of random ones")
    ap.add_argument("--lidc-quality", type=int, default=0, metavar="K",
                    help="with --weights: GED² and HM-IoU of those weights on each backend, "
                         "N samples on the first K slices of --lidc-data, paired with eager")
    ap.add_argument("--lidc-data", default=None, metavar="DIR",
                    help="a LIDC-layout folder at the weights' size (validation slices)")
    args = ap.parse_args()
    if args.lidc_quality and not (args.weights and args.lidc_data):
        ap.error("--lidc-quality needs --weights and --lidc-data")
    set_threads(args.threads)
    from napari_berdiff.diffusion.schedules import timestep_subsequence

    info = machine()
    print(describe(info), flush=True)
    all_rows: list[dict] = []
    if args.bundled:
        model = load_bench_model("bundled")
        image = test_image(128)
        methods = {b: our_method(model, b, image, args.n, None) for b in args.methods}
        n_steps = len(timestep_subsequence(model.diffusion.default_steps,
                                           model.diffusion.timesteps))
        timed = measure(methods, max(args.repeats, 3), "bundled 128")
        rows = rows_for(128, args.n, n_steps, timed, methods, None)
        for r in rows:
            r["method"] = f"phantom-64 {r['method']}"
        print_table(rows, COLUMNS)
        all_rows += rows
        for row in rows:
            if args.quality:
                backend = row["method"].split()[-1]
                q = quality(copy.copy(model).use_backend(backend), args.quality, n=args.n)
                row.update({k: q[k] for k in ("ged2", "ged2_sem", "hm_iou", "hm_iou_sem")})
                print(f"{row['method']}: GED² {q['ged2']:.4f} ± {q['ged2_sem']:.4f}, HM-IoU "
                      f"{q['hm_iou']:.4f} ± {q['hm_iou_sem']:.4f} ({args.quality} phantoms)",
                      flush=True)

    if args.weights:
        ours = load_bench_model(args.weights)
    else:
        ours = load_bench_model("lidc")
        randomise_zero_layers(ours.net)
    print(f"berdiff-lidc-128 layout: {ours.name} ({'trained' if args.weights else 'random'} "
          "weights)", flush=True)
    theirs = copy.deepcopy(ours.net).to(memory_format=torch.contiguous_format).eval()
    T = ours.diffusion.timesteps
    abar = np.array([ours.kernel.schedule.alpha_bar(i) for i in range(T)])
    sch = SpacedSchedule(abar, timestep_subsequence(STEPS, T))
    for size in args.sizes:
        image = test_image(size)
        official_style_loop(theirs, sch, image, 1)  # warm-up, one sample
        methods = {"official loop": {"fn": lambda: official_style_loop(theirs, sch, image,
                                                                       args.n)}}
        methods |= {b: our_method(ours, b, image, args.n, STEPS) for b in args.methods}
        timed = measure(methods, args.repeats, f"{size}²")
        rows = rows_for(size, args.n, len(sch.kept), timed, methods, "official loop")
        print_table(rows, COLUMNS)
        all_rows += rows
    if args.lidc_quality:
        all_rows += lidc_quality(ours, args.methods, args.lidc_data, args.lidc_quality, args.n)
    info["load_average_end"] = machine()["load_average"]
    print(f"load average at the end: {info['load_average_end']}")
    print_table(all_rows, COLUMNS)
    print("speed-up: the official loop's median seconds over the method's (phantom-64 rows: "
          "eager's over the method's)")
    write_json(args.name, {"steps": STEPS, "n": args.n, "results": all_rows}, info)


if __name__ == "__main__":
    main()
