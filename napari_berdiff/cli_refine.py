"""``berdiff refine``: refined masks of a prior mask with a HiDiff-style refiner.

    berdiff refine --model R --image IMG --prior MASK --n 8 --steps 10 --trust 0.7 --out DIR
    berdiff refine --model R --image IMG --prior segmentor --out DIR

``--keep MASK`` and ``--never MASK`` are hard constraints: their non-zero pixels are
foreground (keep) or background (never) in every refined mask.

The prior is a mask file (any non-zero value is the object; softened with ``--trust``), a
probability map in [0, 1] (a float file, used as it is) or ``segmentor``: the probability
map of the segmentor the refiner's metadata names (or ``--segmentor FILE``). The outputs
are those of ``berdiff sample`` (``sample_XX`` masks, the frequency, variance and entropy
maps, ``probabilities.npy``, ``run.json``) plus ``prior`` (the map p that was refined)
and, in ``run.json``, a ``refine`` section: the prior's source, trust, area, and each
sample's area and Dice with the prior mask.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cli import (_check_region, _json_clean, _parse_roi, _parse_steps, _resolve_model,
                  add_run_options, image_spacing, output_folder, read_model_image,
                  run_record, run_with_progress, spacing_note, warn_if_unlike_training,
                  write_results)

__all__ = ["register", "cmd_refine", "read_prior"]


def read_prior(path: str, k: int | None) -> np.ndarray:
    """Read a prior mask or probability map file as a 2-D array (slice ``k`` of a volume)."""
    from .imageio import read_image

    arr, info = read_image(path)
    name = Path(path).name
    if info.get("converted_to_grey"):
        raise ValueError(f"the prior {name} is a colour image; give a mask (labels) file")
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim == 3:
        if k is None:
            raise ValueError(f"the prior {name} is a volume of shape {tuple(arr.shape)}; "
                             "choose its slice with --slice K")
        if not 0 <= k < arr.shape[0]:
            raise ValueError(f"--slice {k} is outside the prior's {arr.shape[0]} slices")
        arr = arr[k]
    if arr.ndim != 2:
        raise ValueError(f"the prior {name} has shape {tuple(arr.shape)}; expected a 2-D mask")
    if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() \
            and arr.min() >= 0 and arr.max() <= 1:
        return arr.astype(np.float32)  # a mask or a probability map
    return (arr > 0).astype(np.float32)  # label ids, 0/255 PNGs …


def read_constraint(path: str | None, k: int | None, flag: str) -> np.ndarray | None:
    """A ``--keep``/``--never`` mask file as a boolean (H, W) array (non-zero: marked)."""
    if path is None:
        return None
    try:
        return read_prior(path, k) > 0
    except ValueError as e:
        raise ValueError(f"{flag} {Path(path).name}: {e}") from None


def _segmentor_prior(args: argparse.Namespace, refiner: Any, model_path: Path,
                     image: np.ndarray, spacing: Any = None) -> tuple[np.ndarray, str]:
    from .checkpoints import load_model
    from .refine import segmentor_path

    seg_file = Path(args.segmentor) if args.segmentor else segmentor_path(refiner, model_path)
    if seg_file is None:
        named = refiner.metadata.get("refiner", {}).get("segmentor")
        raise ValueError(
            f"--prior segmentor: {model_path.name} names no segmentor"
            + (f" ({named} is not next to it)" if named else "")
            + "; give --segmentor FILE or a --prior mask file")
    seg = load_model(_resolve_model(str(seg_file)), device=args.device)
    if seg.kind != "segmentor":
        raise ValueError(f"{seg_file} is a {seg.kind} model, not a segmentor")
    from .spacing import segment_at_spacing

    return segment_at_spacing(seg, image, spacing), str(seg_file)


def cmd_refine(args: argparse.Namespace) -> int:
    """Refine a prior mask: write N refined masks, the uncertainty maps and run.json."""
    with output_folder(args) as tmp:
        summary = _refine_into(args, tmp)
    print(summary)
    return 0


def _refine_into(args: argparse.Namespace, out: Path) -> str:
    """Refine as ``args`` say into the folder ``out``; returns the summary line."""
    from .checkpoints import load_model
    from .diffusion import timestep_subsequence
    from .imageio import write_map
    from .priors import validate_prior
    from .distribution import model_spacing
    from .refine import constraint_map, enforce_constraints, prior_map, refine
    from .spacing import constraints_to_model_grid, map_back, to_model_spacing, zoom_factor
    from .threads import use_threads
    from .uncertainty import dice

    wall0 = time.perf_counter()
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if not 0.0 <= args.trust <= 1.0:
        raise ValueError(f"--trust must lie in [0, 1], got {args.trust}")
    roi = _parse_roi(args.roi)
    steps = _parse_steps(args.steps)
    args.threads_used = use_threads(args.threads)
    model_path = _resolve_model(args.model)
    refiner = load_model(model_path, device=args.device)
    if refiner.kind != "refiner":
        raise ValueError(f"{model_path.name} is a {refiner.kind} model, not a mask refiner; "
                         "give a refiner (e.g. models/refiner-phantom-64.safetensors)")
    load_s = time.perf_counter() - wall0
    image, infos, names = read_model_image(args, refiner)

    spacing = image_spacing(args, infos)
    if args.prior == "segmentor":
        raw, source = _segmentor_prior(args, refiner, model_path, image, spacing)
    else:
        raw, source = read_prior(args.prior, args.slice), args.prior
    try:
        p = prior_map(raw, image.shape[1:], args.trust)
    except ValueError as e:
        raise ValueError(f"--prior {Path(source).name}: {e}") from None
    keep = read_constraint(args.keep, args.slice, "--keep")
    never = read_constraint(args.never, args.slice, "--never")
    constraints = constraint_map(image.shape[1:], keep, never)
    _check_region(refiner, image, roi, args.allow_large, names,
                  zoom_factor(spacing, model_spacing(refiner.data)))
    # at the model's spacing when the image's is known: the image and the prior map p
    small, small_p, how = to_model_spacing(refiner, image, spacing, roi, p)
    if how is not None and constraints is not None:  # the constraints on the model's grid
        on_grid = constraints_to_model_grid(constraints, how, small.shape[1:])
        keep, never = (None, None) if on_grid is None else (on_grid == 1, on_grid == 0)
    spacing_note(refiner, spacing, how)
    notice = warn_if_unlike_training(refiner, small, None if how else roi,
                                     None if how else spacing)

    spec = refiner.diffusion.default_steps if steps is None else steps
    n_steps = len(timestep_subsequence(spec, refiner.diffusion.timesteps))
    stream = refine(refiner, small, raw if how is None else small_p, trust=args.trust,
                    n=args.n, steps=steps, seed=args.seed, roi=None if how else roi,
                    max_batch=args.max_batch, units=infos[0].get("units"), keep=keep,
                    never=never)
    result, visited = run_with_progress(stream, n_steps, args.quiet, "refining")
    result = enforce_constraints(map_back(result, how), constraints)
    written = write_results(out, result, args.n)
    y0, x0, y1, x1 = result.roi
    written += write_map(out / "prior", p[y0:y1, x0:x1], "prior", limits=(0.0, 1.0))

    prior_mask = validate_prior(raw)[y0:y1, x0:x1] > 0.5
    timings = dict(result.timings)
    timings["load_s"] = load_s
    timings["wall_s"] = time.perf_counter() - wall0
    run = run_record(args, refiner, model_path, infos, image, spec, visited, result, timings,
                     written)
    run["input_notice"] = notice
    run["pixel_spacing_used"] = None if spacing is None else list(spacing)
    run["resampled_zoom"] = None if how is None else round(how.zoom, 6)
    run["refine"] = {
        "prior": source,
        "prior_kind": "segmentor" if args.prior == "segmentor" else "file",
        "trust": args.trust,
        "prior_area_px": int(prior_mask.sum()),
        "sample_area_px": [int(m.sum()) for m in result.masks],
        "sample_dice_with_prior": [round(float(dice(m, prior_mask)), 4) for m in result.masks],
        "mean_mask_area_px": int((result.probs.mean(0) > 0.5).sum()),
        "conditioning": refiner.metadata.get("refiner", {}).get("conditioning"),
        "keep": args.keep, "never": args.never,
        "keep_px": 0 if constraints is None else int((constraints == 1).sum()),
        "never_px": 0 if constraints is None else int((constraints == 0).sum()),
    }
    (out / "run.json").write_text(json.dumps(_json_clean(run), indent=2) + "\n")
    return (f"wrote {args.n} refined masks, the prior and the uncertainty maps "
            f"({y1 - y0}×{x1 - x0}, box {y0},{x0},{y1},{x1}) to {args.out} "
            f"in {timings['wall_s']:.1f} s")


def register(subparsers: Any) -> None:
    """Add ``refine`` to the ``berdiff`` sub-command parsers."""
    p = subparsers.add_parser(
        "refine", help="refine a rough mask into N plausible masks (HiDiff-style refiner)",
        description="Refine a prior mask (a drawn or edited mask, a probability map, or the "
                    "refiner's segmentor) with a Bernoulli refiner conditioned on the image "
                    "and the prior. Writes the refined masks, the uncertainty maps, the prior "
                    "map and run.json.")
    p.add_argument("--model", required=True, help="refiner file or bundled model name")
    p.add_argument("--image", required=True, nargs="+",
                   help="image file (PNG, JPEG, TIFF, NPY, NIfTI, DICOM)")
    p.add_argument("--prior", required=True,
                   help="mask or probability-map file of the image's size, or 'segmentor'")
    p.add_argument("--segmentor", help="segmentor file for --prior segmentor (default: the one "
                                       "the refiner names)")
    p.add_argument("--keep", help="mask file: its non-zero pixels are foreground in every "
                                  "refined mask (hard constraint)")
    p.add_argument("--never", help="mask file: its non-zero pixels are background in every "
                                   "refined mask (hard constraint)")
    p.add_argument("--n", type=int, default=8, help="number of refined masks (default 8)")
    p.add_argument("--steps", help="sampling steps (default: the model's)")
    p.add_argument("--trust", type=float, default=0.7,
                   help="how far a binary prior's boundary is believed, 0..1 (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True,
                   help="output folder: new or empty (or a previous run, with --force)")
    add_run_options(p, "refine", "slice index of a 3D volume (image and prior)")
    p.set_defaults(func=cmd_refine)
