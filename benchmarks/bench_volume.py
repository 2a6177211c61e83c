"""Volumes batched across slices against slice by slice (issue 26, item 3).

For the bundled default model: the wall time of sampling ``--n`` samples of each slice of
a ``--slices``-slice volume of ``--size``² phantoms at the model's default steps, run slice
by slice (one :meth:`sample` per slice, as the widget did) and batched
(:meth:`sample_slices`: up to ``--max-slices`` slices and ``--max-rows`` samples per
network call, the first slice alone), alternating within one run; the ratio; the time from
the start to the first slice's first frame in units of one single-slice step; and the
largest difference between the two modes' outputs (they should be the same samples).

    OMP_NUM_THREADS=1 python benchmarks/bench_volume.py --threads 1 --repeats 1
    OMP_NUM_THREADS=1 python benchmarks/bench_volume.py --threads 1 --max-rows none
    python benchmarks/bench_volume.py --model default --lidc --repeats 3

``--lidc``: the volume is ``--slices`` semi-real LIDC test slices (CT rendered around the
readers' real contours, the central 128² of the 0.5 mm crops, as the demo nodule), each
resampled to the model's spacing before sampling and its probabilities mapped back, as the
widget's "All slices" does with a layer whose scale is known; the time includes both
resamplings. ``--model default`` is the bundled default (``DEFAULT_MODEL``).
"""

from __future__ import annotations

import time

import numpy as np

from _common import (BUNDLED, base_parser, describe, load_bench_model, machine, median,
                     write_json)

from napari_berdiff.diffusion.volume import DEFAULT_MAX_SLICES
from napari_berdiff.lazy import LazySequence


def _volume(slices: int, size: int) -> list[np.ndarray]:
    from napari_berdiff.data.phantoms import make_phantom

    return [make_phantom(900_000 + z, size).image.astype(np.float32) for z in range(slices)]


def _lidc_volume(slices: int) -> tuple[list[np.ndarray], tuple[float, float]]:
    """The first ``slices`` semi-real LIDC test slices (128² at 0.5 mm) and their spacing."""
    from itertools import islice

    from napari_berdiff.data.layout import center_crop
    from napari_berdiff.data.lidc import LIDC_SPACING_MM, load_lidc_readers
    from napari_berdiff.data.lidc_render import render_slice

    items = islice(load_lidc_readers().slices("test"), slices)
    vol = [center_crop(render_slice(it, seed=0)["image"], 128).astype(np.float32)
           for it in items]
    return vol, (LIDC_SPACING_MM, LIDC_SPACING_MM)


class _Grid:
    """Each slice on the model's grid (when the spacing says so) and the probabilities
    back on the slice's, so that both modes pay the widget's resampling."""

    def __init__(self, model, spacing):
        self.model, self.spacing = model, spacing

    def to_model(self, vol):
        if self.spacing is None:
            return vol, [None] * len(vol)
        from napari_berdiff.spacing import to_model_spacing

        out = [to_model_spacing(self.model, img, self.spacing)[::2] for img in vol]
        return [o[0] for o in out], [o[1] for o in out]

    @staticmethod
    def back(probs, how):
        if how is None:
            return probs
        from napari_berdiff.spacing import resample_back

        return resample_back(probs, how.shape).clip(0, 1)


def _slice_by_slice(model, vol, n, seed, grid) -> dict:
    tic = time.perf_counter()
    first, steps, probs = None, [], []
    for z, img in enumerate(vol):
        (img,), (how,) = grid.to_model([img])
        stream = model.sample(img, n, None, seed + z)
        last = time.perf_counter()
        for _frame in stream:
            now = time.perf_counter()
            if first is None:
                first = now - tic
            steps.append(now - last)
            last = now
        probs.append(grid.back(stream.result.probs, how))
    # a step's time: a frame after the first of its slice (the first one includes encoding)
    n_steps = len(steps) // len(vol)
    later = [s for i, s in enumerate(steps) if i % n_steps]
    return {"total_s": time.perf_counter() - tic, "first_frame_s": first,
            "step_s": median(later), "probs": probs}


def _batched(model, vol, n, seed, max_slices, max_rows, grid) -> dict:
    tic = time.perf_counter()
    # each slice resampled when its batch starts, as the widget's "All slices" does
    on_grid = LazySequence(lambda z: grid.to_model([vol[z]]), len(vol))
    stream = model.sample_slices(LazySequence(lambda z: on_grid[z][0][0], len(vol)), n, None,
                                 [seed + z for z in range(len(vol))],
                                 max_slices=max_slices, max_rows=max_rows)
    first = None
    for _sf in stream:
        if first is None:
            first = time.perf_counter() - tic
    return {"total_s": time.perf_counter() - tic, "first_frame_s": first,
            "probs": [grid.back(r.probs, on_grid[z][1][0])
                      for z, r in enumerate(stream.results)],
            "slices_per_batch": stream.plan.slices,
            "chunk": stream.plan.chunk, "memory": stream.plan.memory.describe()}


def main() -> None:
    ap = base_parser(__doc__, "bench_volume", repeats=1)
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--model", default="bundled",
                    help="bundled (the phantom model), default (the bundled default) or a file")
    ap.add_argument("--lidc", action="store_true",
                    help="semi-real LIDC test slices, 128² at 0.5 mm, resampled to the "
                         "model's spacing (--size is then 128)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-slices", type=int, default=DEFAULT_MAX_SLICES)
    ap.add_argument("--max-rows", default="auto",
                    help="rows per network call batching stops at: auto (the device's "
                         "default), none, or a number")
    args = ap.parse_args()
    choice = args.max_rows.lower()
    max_rows = {"auto": "auto", "none": None}[choice] if choice in ("auto", "none") \
        else int(choice)
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.model == "default":
        from napari_berdiff.checkpoints.info import DEFAULT_MODEL

        args.model = str(BUNDLED.parent / f"{DEFAULT_MODEL}.safetensors")
    model = load_bench_model(args.model)
    info = machine(str(model.device))
    print(describe(info))
    if args.lidc:
        vol, spacing = _lidc_volume(args.slices)
        args.size = vol[0].shape[-1]
    else:
        vol, spacing = _volume(args.slices, args.size), None
    grid = _Grid(model, spacing)
    print(f"{model.name}: {len(vol)} slices of {args.size}²"
          + (f" at {spacing[0]} mm, sampled at the model's spacing" if spacing else ""))
    model.sample_all(grid.to_model(vol[:1])[0][0], 2, 1, 0)  # warm-up: library set-up
    rows = []
    for r in range(args.repeats):
        pair = {}
        for mode in (("slice", "batched") if r % 2 == 0 else ("batched", "slice")):
            pair[mode] = (_slice_by_slice(model, vol, args.n, 100 * r, grid)
                          if mode == "slice"
                          else _batched(model, vol, args.n, 100 * r, args.max_slices,
                                        max_rows, grid))
        s, b = pair["slice"], pair["batched"]
        diff = max(float(np.abs(p - q).max()) for p, q in zip(s["probs"], b["probs"]))
        masks_equal = all(np.array_equal(p > 0.5, q > 0.5)
                          for p, q in zip(s["probs"], b["probs"]))
        rows.append({
            "slice_by_slice_s": s["total_s"], "batched_s": b["total_s"],
            "ratio_batched_over_slice": b["total_s"] / s["total_s"],
            "one_step_s": s["step_s"],
            "first_frame_batched_s": b["first_frame_s"],
            "first_frame_slice_s": s["first_frame_s"],
            "first_frame_batched_in_steps": b["first_frame_s"] / s["step_s"],
            "max_abs_prob_diff": diff, "masks_equal": masks_equal,
            "slices_per_batch": b["slices_per_batch"], "chunk": b["chunk"],
        })
        print(f"run {r + 1}: slice by slice {s['total_s']:.1f} s, batched "
              f"{b['total_s']:.1f} s ({b['slices_per_batch']} slices x {args.n} per call; "
              f"ratio {rows[-1]['ratio_batched_over_slice']:.3f}); one step "
              f"{s['step_s'] * 1000:.0f} ms; first frame batched {b['first_frame_s']:.2f} s "
              f"= {rows[-1]['first_frame_batched_in_steps']:.2f} steps (slice by slice "
              f"{s['first_frame_s']:.2f} s); max |dp| {diff:.2e}, masks equal "
              f"{masks_equal}")
        print(f"  memory plan of a batch: {b['memory']}")
    numeric = [k for k, v in rows[0].items() if isinstance(v, float)]
    med = {k: median(r[k] for r in rows) for k in numeric}
    print(f"median of {len(rows)} run(s): {args.slices} slices of {args.size}² x {args.n} "
          f"samples x {model.diffusion.default_steps} steps: slice by slice "
          f"{med['slice_by_slice_s']:.1f} s, batched {med['batched_s']:.1f} s, ratio "
          f"{med['ratio_batched_over_slice']:.3f}; first frame "
          f"{med['first_frame_batched_in_steps']:.2f} steps")
    write_json(args.name, {"args": vars(args), "runs": rows, "median": med}, info)


if __name__ == "__main__":
    main()
