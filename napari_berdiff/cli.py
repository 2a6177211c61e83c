"""The ``berdiff`` command: ``info``, ``convert`` and ``sample`` (plus ``train``, ``evaluate``
and ``data`` from :mod:`napari_berdiff.cli_training`; DDP: ``torchrun --nproc_per_node 2 -m napari_berdiff.cli train …``).

``main(argv)`` returns an exit code (0 ok, 2 for a usage or input error, 130 when
interrupted) and never calls ``sys.exit`` itself. Errors are printed as
``berdiff: error: <message>`` with no traceback. Torch is imported only by the commands
that need it, so ``berdiff --help`` is quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROG = "berdiff"
#: The sampler's default memory budget (MB); kept here so ``--help`` needs no torch.
DEFAULT_BUDGET_MB = 1536
#: The inference backends (napari_berdiff.backends.BACKENDS; here so ``--help`` needs no torch).
BACKENDS = ("eager", "jit", "onnxruntime", "openvino", "openvino-bf16", "bf16")
#: Options whose value may start with a minus sign (argparse takes "-10,0,64,64" for an option).
SIGNED_VALUE_OPTIONS = ("--roi",)
MAPS = ("frequency", "variance", "entropy")


# ---------------------------------------------------------------------------- helpers
def _note(msg: str) -> None:
    print(f"{PROG}: note: {msg}", file=sys.stderr)


def _resolve_model(arg: str) -> Path:
    p = Path(arg)
    if p.exists():
        return p
    from .checkpoints import list_bundled_models

    bundled = list_bundled_models()
    for f in bundled:
        if f.stem == arg or f.name == arg:
            return f
    names = ", ".join(f.stem for f in bundled) or "none installed"
    raise ValueError(f"no such model file: {arg} (bundled models: {names})")


def _parse_roi(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    try:
        box = tuple(int(v) for v in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(
            f"--roi takes four whole numbers y0,x0,y1,x1 (e.g. 0,0,128,128); got {text!r}"
        )
    return box  # type: ignore[return-value]


def _parse_steps(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.strip().isdigit() else text.strip()


def _centred(y0: int, x0: int, h: int, w: int, bh: int, bw: int) -> str:
    cy, cx = y0 + (h - bh) // 2, x0 + (w - bw) // 2
    return f"{cy},{cx},{cy + bh},{cx + bw}"


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_clean(obj.item())
    return obj


# ---------------------------------------------------------------------------- info
def _describe_network(net: dict | None) -> str:
    if not net:
        return "unknown"
    if net.get("type") != "unet":
        return str(net.get("type"))
    size = net.get("image_size")
    ds = net.get("attention_resolutions") or []
    att = ", ".join(
        f"1/{d}" + (f" ({size // d}×{size // d} px)" if size else "") for d in ds
    ) or "none"
    order = "[x_t, image]" if net.get("concat_order") == "mask_first" else "[image, x_t]"
    return (f"UNet, {net.get('model_channels')} base channels, channel_mult "
            f"{tuple(net.get('channel_mult', ()))}, {net.get('num_res_blocks')} res blocks, "
            f"attention at {att} with {net.get('num_heads')} head(s), "
            f"{net.get('image_channels')} image channel(s), input {order}, "
            f"{net.get('out_channels')} output channel(s), output {net.get('output_activation')}")


def _describe_diffusion(d: dict | None) -> str:
    if not d:
        return "unknown"
    text = (f"{d.get('kind')}, T={d.get('timesteps')}, {d.get('schedule')} schedule, "
            f"predicts {d.get('prediction')}, {d.get('default_steps')} steps by default")
    if d.get("kind") == "gaussian":
        text += f", {d.get('sampler')} sampler"
        text += ", learned sigma" if d.get("learn_sigma") else ""
    return text


def _describe_data(data: dict) -> str:
    if not data:
        return "not recorded"
    bits = []
    if data.get("description"):
        bits.append(str(data["description"]))
    if data.get("image_size"):
        bits.append(f"image {data['image_size']} px")
    if data.get("image_channels") is not None:
        bits.append(f"{data['image_channels']} channel(s)")
    norm = data.get("normalisation")
    if isinstance(norm, dict):
        bits.append("normalisation " + ", ".join(f"{k}={v}" for k, v in norm.items()))
    if data.get("spacing"):
        bits.append(f"pixel spacing {data['spacing']}")
    if data.get("window"):
        w = data["window"]
        bits.append(f"window W{w.get('width')}/L{w.get('level')} {w.get('units', 'HU')}")
    return "; ".join(bits)


def _describe_mapping(d: dict) -> str:
    if not d:
        return "none recorded"
    return "; ".join(f"{k}={v}" for k, v in d.items())


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import describe

    d = describe(_resolve_model(args.file), preset=args.preset, verify=True)
    if args.json:
        print(json.dumps(_json_clean(d), indent=2))
        return 0
    rows = [
        ("file", f"{d['file']} ({d['size_bytes'] / 1e6:.1f} MB)"),
        ("format", d["file_format"]),
        ("sha256", d.get("sha256", "")),
        ("kind", d.get("kind")),
        ("name", d.get("name") or "-"),
        ("preset", d.get("preset") or "-"),
        ("architecture", _describe_network(d.get("architecture"))),
        ("parameters", f"{d['parameters']:,} ({d['tensors']} tensors)"),
        ("diffusion", _describe_diffusion(d.get("diffusion"))),
        ("training data", _describe_data(d.get("data") or {})),
        ("training", _describe_mapping(d.get("training") or {})),
        ("metrics", _describe_mapping(d.get("metrics") or {})),
        ("verified", d.get("verified", "-")),
    ]
    if d.get("note"):
        rows.append(("note", d["note"]))
    for key, value in rows:
        print(f"{key:<14}{value}")
    return 0


# ---------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import load_model, save_model, sha256_of

    src, out = Path(args.input), Path(args.output)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {out.name}")
    if out.resolve() == src.resolve():
        raise ValueError("the output would overwrite the input; choose another -o")
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ValueError(f"the output folder {out.parent} does not exist")
    model = load_model(src, preset=args.preset, device="cpu")
    extra: dict[str, Any] = {
        "training": {**model.metadata.get("training", {}),
                     "converted_from": {"file": src.name, "sha256": sha256_of(src)}},
    }
    if args.name:
        extra["name"] = args.name
    from .outfolder import replace_from_temporary, temporary_path

    tmp = temporary_path(out)  # whole or not at all: a kill never leaves half a file
    try:
        save_model(model, tmp, metadata=extra)
        replace_from_temporary(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}: {model.metadata.get('preset') or model.name}, {model.kind}, "
          f"{model.num_parameters():,} parameters")
    return 0


# ---------------------------------------------------------------------------- sample
def _open_planes(paths: Sequence[str], k: int | None, channels: int
                 ) -> tuple[list[tuple[Any, tuple]], list[dict]]:
    """Open the image(s) and choose the plane of each to sample, without reading pixels:
    a list of (source, key prefix) whose keys select (C, H, W) or (H, W), plus the infos."""
    from .imageio import open_image

    chosen, infos = [], []
    for path in paths:
        src = open_image(path)
        info, shape, name = src.info, src.shape, Path(path).name
        infos.append(info)
        if info["converted_to_grey"]:
            _note(f"{name} is a colour image; converted it to grey (luminance) for the model")
        if len(shape) == 2:
            if k is not None:
                raise ValueError(f"--slice applies to 3D volumes; {name} is a 2D image")
            chosen.append((src, ()))
        elif len(shape) in (3, 4):
            if k is not None:
                if not 0 <= k < shape[0]:
                    raise ValueError(f"--slice {k} is outside {name}'s {shape[0]} slices "
                                     f"(0..{shape[0] - 1})")
                chosen.append((src, (k,)))
            elif len(shape) == 3 and (info["axes"] == "CYX" or shape[0] == channels) \
                    and len(paths) == 1:
                chosen.append((src, (slice(None),)))
            else:
                raise ValueError(
                    f"{name} is a {len(shape)}D volume of shape {tuple(shape)} "
                    f"(axes {info['axes']}); choose a slice with --slice K, "
                    f"K in 0..{shape[0] - 1}"
                )
        else:
            raise ValueError(f"{name} has {len(shape)} dimensions (shape {tuple(shape)}); "
                             "expected a 2D image or a 3D volume")
    sizes = {tuple(src.shape[-2:]) for src, _ in chosen}
    if len(sizes) > 1:
        raise ValueError(f"the images have different sizes: {sorted(sizes)}")
    return chosen, infos


def _plane_channels(chosen: list[tuple[Any, tuple]]) -> int:
    return sum(src.shape[len(key)] if len(src.shape) - len(key) == 3 else 1
               for src, key in chosen)


def _read_chosen(chosen: list[tuple[Any, tuple]], box: tuple[int, int, int, int] | None
                 ) -> np.ndarray:
    """Read the chosen planes (only the box, when given) as one (C, H, W) array."""
    region = () if box is None else (slice(box[0], box[2]), slice(box[1], box[3]))
    planes = []
    for src, key in chosen:
        if region:
            key = key + (slice(None),) * (len(src.shape) - len(key) - 2) + region
        plane = src.read(key)
        planes.append(plane[None] if plane.ndim == 2 else plane)
    # Keep the file's dtype: the model's normalisation reads 8-bit data as value/255.
    return np.concatenate(planes, 0)


def _read_planes(
    paths: Sequence[str], k: int | None, channels: int
) -> tuple[np.ndarray, list[dict]]:
    """Read the image(s) and return the (C, H, W) plane to sample, plus the readers' info."""
    chosen, infos = _open_planes(paths, k, channels)
    return _read_chosen(chosen, None), infos


def _check_region(model: Any, image: np.ndarray | tuple[int, int], roi: tuple | None,
                  allow_large: bool, image_name: str, zoom: float | None = None) -> None:
    """Refuse a whole image more than twice the model's training size (in the model's
    pixels, after resampling by ``zoom``) unless allowed (``image``: the (C, H, W) image or
    its (H, W))."""
    from .diffusion.sampler import check_roi

    h, w = image if isinstance(image, tuple) else image.shape[1:]
    box = check_roi(roi, (h, w))
    y0, x0, y1, x1 = box
    train = int(model.data.get("image_size") or model.net.config.image_size)
    if roi is None and max(h, w) * (zoom or 1.0) > 2 * train and not allow_large:
        bh, bw = min(train, h), min(train, w)
        raise ValueError(
            f"{image_name} is {h}×{w} pixels, more than twice the model's training size "
            f"({train} px). Nothing is cropped silently: choose a region with --roi y0,x0,y1,x1 "
            f"(e.g. --roi {_centred(0, 0, h, w, bh, bw)}, the central {bh}×{bw}) or pass "
            "--allow-large to sample the whole image anyway (still within the memory "
            "budget)"
        )


def image_spacing(args: argparse.Namespace, infos: list[dict]) -> tuple[float, ...] | None:
    """The image's in-plane spacing in mm: ``--spacing``, else the file's header, else None."""
    text = getattr(args, "spacing", None)
    if text:
        try:
            vals = tuple(float(v) for v in str(text).replace(" ", "").split(",") if v)
        except ValueError:
            vals = ()
        if len(vals) not in (1, 2) or min(vals) <= 0:
            raise ValueError(f"--spacing takes one or two positive numbers in mm (row,col), "
                             f"got {text!r}")
        return vals
    sp = infos[0].get("spacing") if infos else None
    return None if sp is None else tuple(float(v) for v in tuple(sp)[-2:])


def spacing_note(model: Any, spacing: Any, how: Any) -> None:
    """Say once how the image's pixel spacing was handled."""
    from .distribution import model_spacing

    ms = model_spacing(model.data)
    if ms is None:
        return
    if spacing is None:
        _note(f"the image's pixel spacing is unknown: sampling it as if it were the model's "
              f"({ms:.3g} mm); give --spacing MM to resample it to the model's")
    elif how is not None:
        _note(f"resampling the region from {np.mean(spacing):.3g} mm to the model's {ms:.3g} mm "
              "pixels, and the results back")


def warn_if_unlike_training(model: Any, image: np.ndarray, roi: tuple | None,
                            spacing: Any) -> str | None:
    """Print (and return) the out-of-distribution notice for the region to be sampled."""
    notice = model.input_notice(image, roi, spacing)
    if notice:
        _note(notice + " Sampling anyway.")
    return notice


def run_with_progress(stream: Any, n_steps: int, quiet: bool, desc: str
                      ) -> tuple[Any, list[int]]:
    """Run a sample stream to the end under a tqdm bar; returns (result, visited t's).

    Raises ``ValueError`` when the run produced nothing or the network produced NaNs.
    """
    from tqdm import tqdm

    visited: list[int] = []
    bar = tqdm(total=n_steps, file=sys.stderr, unit="step", desc=desc, disable=quiet,
               leave=False)
    try:
        for frame in stream:
            visited.append(int(frame.t))
            bar.update(1)
        result = stream.result
    finally:
        bar.close()
    if result.probs is None:
        raise ValueError("sampling stopped before its first step finished; nothing was written")
    bad = int((~np.isfinite(result.probs)).sum())
    if bad:
        raise ValueError(
            f"the network produced {bad} NaN or infinite probabilities; the checkpoint's weights "
            "look broken (or belong to another architecture). Nothing was written"
        )
    return result, visited


def write_results(out: Path, result: Any, n: int) -> list[Path]:
    """Write the sample masks, the uncertainty maps and ``probabilities.npy`` to ``out``."""
    from .imageio import write_map, write_mask

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    digits = max(2, len(str(n - 1)))
    for i, mask in enumerate(result.masks):
        written += write_mask(out / f"sample_{i:0{digits}d}", mask)
    maps = result.maps
    for name in MAPS:
        written += write_map(out / name, maps[name], name)
    np.save(out / "probabilities.npy", result.probs)
    written.append(out / "probabilities.npy")
    return written


def _step_option(args: argparse.Namespace, model: Any, key: str) -> Any:
    """A Bernoulli step option as the run used it: the command line's, else the model's."""
    given = getattr(args, key, None)
    return getattr(model.diffusion, key) if given is None else given


def run_record(args: argparse.Namespace, model: Any, model_path: Path, infos: list[dict],
               image: np.ndarray, spec: Any, visited: list[int], result: Any,
               timings: dict[str, float], written: list[Path]) -> dict[str, Any]:
    """The ``run.json`` document of a sampling (or refining) run."""
    from . import __version__
    from .checkpoints import sha256_of

    return {
        "napari_berdiff_version": __version__,
        "model_path": str(model_path),
        "model_sha256": sha256_of(model_path),
        "model_name": model.name,
        "model_kind": model.kind,
        "model_preset": model.metadata.get("preset"),
        "image_path": [str(p) for p in args.image] if len(args.image) > 1 else str(args.image[0]),
        "image_shape": ([list(i["shape"]) for i in infos] if len(infos) > 1
                        else list(infos[0]["shape"])),
        "sampled_shape": list(image.shape),
        "slice": args.slice,
        "converted_to_grey": any(i["converted_to_grey"] for i in infos),
        "pixel_spacing": infos[0].get("spacing"),
        "n": args.n,
        "seed": result.seed,
        "steps": spec,
        **{key: _step_option(args, model, key) for key in ("draw_correlation", "temperature")},
        "timesteps": visited,
        "steps_done": result.steps_done,
        "roi": list(result.roi),
        "roi_requested": args.roi is not None,
        "device": result.device,
        "threads": getattr(args, "threads_used", None),
        "backend": getattr(args, "backend", "eager"),
        "chunk_size": result.chunk_size,
        "presence": result.presence,
        "readers": None if result.readers is None else result.readers.tolist(),
        "timings": timings,
        "outputs": sorted(p.name for p in written) + ["run.json"],
    }


def read_model_image(args: argparse.Namespace, model: Any) -> tuple[np.ndarray, list[dict], str]:
    """The (C, H, W) image of ``--image``/``--slice`` for ``model``, the readers' info and
    the file names (checks the channel count)."""
    image, infos, names, _, _ = read_model_region(args, model, None)
    return image, infos, names


def read_model_region(args: argparse.Namespace, model: Any, roi: tuple | None,
                      check: Any = None
                      ) -> tuple[np.ndarray, list[dict], str, tuple, tuple[int, int]]:
    """Like :func:`read_model_image`, but read only the box ``roi`` (validated against the
    image's size) from the file(s); returns the (C, h, w) region, the infos, the names,
    the box in image coordinates and the image's (H, W). ``check(names, (H, W), box, infos)`` runs before any pixel is
    read (the size and memory checks)."""
    from .diffusion.sampler import check_roi

    chosen, infos = _open_planes(args.image, args.slice, model.image_channels)
    names = ", ".join(Path(p).name for p in args.image)
    channels = _plane_channels(chosen)
    if channels != model.image_channels:
        raise ValueError(
            f"the model takes {model.image_channels} image channel(s) but the image has "
            f"{channels} ({names})"
            + ("; give one --image per channel" if model.image_channels > 1 else "")
        )
    hw = tuple(chosen[0][0].shape[-2:])
    box = check_roi(roi, hw)
    if check is not None:
        check(names, hw, box, infos)
    return _read_chosen(chosen, None if roi is None else box), infos, names, box, hw


def output_folder(args: argparse.Namespace) -> Any:
    """The ``--out`` folder of a sampling (or refining) run, checked before any work: the
    run is written beside it and moved into place whole (:mod:`napari_berdiff.outfolder`)."""
    from .outfolder import OutputFolder

    inputs = [*args.image, *([args.model] if Path(args.model).exists() else []),
              *([args.prior] if getattr(args, "prior", "segmentor") != "segmentor" else [])]
    return OutputFolder(args.out, force=args.force, inputs=inputs)


def cmd_sample(args: argparse.Namespace) -> int:
    with output_folder(args) as tmp:
        summary = _sample_into(args, tmp)
    print(summary)
    return 0


def _sample_into(args: argparse.Namespace, out: Path) -> str:
    """Sample as ``args`` say into the folder ``out``; returns the summary line."""
    from .checkpoints import load_model
    from .diffusion import timestep_subsequence
    from .diffusion.sampler import check_seed, plan_memory
    from .distribution import model_spacing
    from .spacing import map_back, to_model_spacing, zoom_factor
    from .threads import use_threads

    wall0 = time.perf_counter()
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    try:
        check_seed(args.seed)
    except ValueError as e:
        raise ValueError(f"--seed: {e}") from None
    if args.memory_budget is not None and not 0 < args.memory_budget < float("inf"):
        raise ValueError(f"--memory-budget must be a positive number of MB, "
                         f"got {args.memory_budget}")
    roi = _parse_roi(args.roi)
    steps = _parse_steps(args.steps)
    args.threads_used = use_threads(args.threads)
    model_path = _resolve_model(args.model)
    model = load_model(model_path, preset=args.preset, device=args.device)
    from .backends import BackendUnavailable

    try:
        model.use_backend(args.backend)
    except BackendUnavailable as e:  # an ImportError: say it as a usage error
        raise ValueError(str(e)) from None
    load_s = time.perf_counter() - wall0

    def check(names: str, hw: tuple[int, int], box: tuple, infos: list[dict]) -> None:
        # Before any pixel is read: the size rule, then every stage's peak memory (at the
        # model's spacing, when the image's is known).
        zoom = zoom_factor(image_spacing(args, infos), model_spacing(model.data))
        _check_region(model, hw, roi, args.allow_large, names, zoom)
        z = zoom or 1.0
        plan_memory(model.net, args.n, model.network_channels,
                    max(1, round((box[2] - box[0]) * z)), max(1, round((box[3] - box[1]) * z)),
                    args.max_batch, args.memory_budget, model.device)

    # Only the region is read from the file; the sampler sees it as the whole image.
    image, infos, names, box, hw = read_model_region(args, model, roi, check)
    spacing = image_spacing(args, infos)
    small, _, how = to_model_spacing(model, image, spacing, None)
    spacing_note(model, spacing, how)
    notice = warn_if_unlike_training(model, small, None, None if how else spacing)

    spec = model.diffusion.default_steps if steps is None else steps
    n_steps = len(timestep_subsequence(spec, model.diffusion.timesteps))
    stream = model.sample(small, n=args.n, steps=steps, seed=args.seed,
                          max_batch=args.max_batch, draw_correlation=args.draw_correlation,
                          temperature=args.temperature, memory_budget_mb=args.memory_budget,
                          units=infos[0].get("units"))
    result, visited = run_with_progress(stream, n_steps, args.quiet, "sampling")
    result = dataclasses.replace(map_back(result, how), roi=box)
    written = write_results(out, result, args.n)

    timings = dict(result.timings)
    timings["load_s"] = load_s
    timings["wall_s"] = time.perf_counter() - wall0
    plane = np.broadcast_to(np.float32(0), (image.shape[0], *hw))  # the plane's shape only
    run = run_record(args, model, model_path, infos, plane, spec, visited, result, timings,
                     written)
    run["input_notice"] = notice
    run["pixel_spacing_used"] = None if spacing is None else list(spacing)
    run["resampled_zoom"] = None if how is None else round(how.zoom, 6)
    (out / "run.json").write_text(json.dumps(_json_clean(run), indent=2) + "\n")
    y0, x0, y1, x1 = result.roi
    return (f"wrote {args.n} sample masks and the {', '.join(MAPS)} maps "
            f"({y1 - y0}×{x1 - x0}, box {y0},{x0},{y1},{x1}) to {args.out} "
            f"in {timings['wall_s']:.1f} s")


# ---------------------------------------------------------------------------- parser
def add_run_options(p: argparse.ArgumentParser, verb: str, slice_help: str) -> None:
    """The options ``sample`` and ``refine`` share: device, region, slice, batch, quiet."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    p.add_argument("--roi", help=f"{verb} only the box y0,x0,y1,x1 (pixels; end exclusive)")
    p.add_argument("--slice", type=int, help=slice_help)
    p.add_argument("--allow-large", action="store_true",
                   help=f"{verb} an image larger than twice the training size without --roi")
    p.add_argument("--max-batch", type=int, help="at most this many samples per network call")
    p.add_argument("--threads", default="auto",
                   help="torch threads: a count, or 'auto' (default): the cores other "
                        "processes leave free right now (napari_berdiff.threads)")
    p.add_argument("--spacing", help="the image's pixel spacing in mm (one number, or row,col); "
                                     "default: the file's header when it has one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out that holds a previous run, whole (the old "
                        "run is removed only once the new one is complete)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Diffusion-model segmentation with uncertainty (napari-berdiff engine).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="describe a checkpoint file",
                       description="Check a checkpoint (every tensor read and finite, the "
                                   "metadata validated, the network loaded) and print what it "
                                   "is: kind, architecture, parameter count, diffusion "
                                   "settings, training data and metrics.")
    p.add_argument("file", help="a .safetensors file, an official .pt file or a bundled model name")
    p.add_argument("--preset", help="the preset of an official file no preset is recognised for")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write our .safetensors format from an official .pt file",
                       description="Convert an official BerDiff / Wolleb state_dict to the "
                                   "napari-berdiff .safetensors format.")
    p.add_argument("input", help="official .pt file (BerDiff_epsilon.pt, model*.pt, ema_*.pt …)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--preset", help="model preset (recognised from the file when omitted)")
    p.add_argument("--name", help="a name to store in the file")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("sample", help="sample N plausible masks and uncertainty maps",
                       description="Sample N masks for an image and write them with the "
                                   "frequency, variance and entropy maps and run.json.")
    p.add_argument("--model", required=True, help="checkpoint file or bundled model name")
    p.add_argument("--image", required=True, nargs="+",
                   help="image file (PNG, JPEG, TIFF, NPY, NIfTI, DICOM) or a DICOM series "
                        "folder; one per channel for multi-channel models")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--steps", help="sampling steps: a number, or a spec such as ddimuni10 "
                                   "(default: the model's)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed, 0..2**64-1 (default 0); run.json records it")
    p.add_argument("--draw-correlation", type=float, metavar="RHO",
                   help="Bernoulli models: correlation in [0, 1] of a step's draws within a "
                        "sample; 0 draws pixels independently as BerDiff does (default: the "
                        "model's)")
    p.add_argument("--temperature", type=float, metavar="TAU",
                   help="Bernoulli models: each step draws from x0 sharpened by 1/TAU on the "
                        "logit; 1 is BerDiff's step, below 1 moves each sample towards its most "
                        "likely mask (default: the model's)")
    p.add_argument("--out", required=True,
                   help="output folder: new or empty (or a previous run, with --force)")
    p.add_argument("--preset", help="preset for an official .pt file")
    p.add_argument("--memory-budget", type=float, metavar="MB", default=DEFAULT_BUDGET_MB,
                   help="peak memory a run may plan for, all stages together (image, image "
                        "encoder, the N samples, the network); the batch is chunked to fit and "
                        "a run that cannot fit is refused before it starts. Never more than "
                        f"80%% of the memory free on the device (default {DEFAULT_BUDGET_MB})")
    p.add_argument("--backend", default="eager", choices=BACKENDS,
                   help="inference backend: eager PyTorch (default); jit (TorchScript frozen, "
                        "oneDNN); onnxruntime (pip install napari-berdiff[onnx]); openvino "
                        "(pip install napari-berdiff[openvino]; float32); openvino-bf16 (the "
                        "same in bfloat16, the fastest on CPUs with AMX); bf16 "
                        "(bfloat16 autocast: fast on CPUs with AMX/AVX512-BF16, output within "
                        "about 1e-2, so seeded masks differ in a few pixels)")
    add_run_options(p, "sample", "slice index of a 3D volume (first axis)")
    p.set_defaults(func=cmd_sample)

    from .cli_training import register  # train, evaluate, data
    from .cli_refine import register as register_refine  # refine

    register(sub)
    register_refine(sub)
    return parser


def _attach_signed_values(argv: Sequence[str]) -> list[str]:
    """``--roi -10,0,64,64`` as ``--roi=-10,0,64,64``, so that argparse takes a value that
    starts with a minus sign as the option's value (the range check then explains it)."""
    out, items = [], list(argv)
    i = 0
    while i < len(items):
        if items[i] in SIGNED_VALUE_OPTIONS and i + 1 < len(items) \
                and re.fullmatch(r"-[\d.][\d.,\s-]*", items[i + 1]):
            out.append(f"{items[i]}={items[i + 1]}")
            i += 2
        else:
            out.append(items[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``berdiff`` command and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(_attach_signed_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help, or argparse's own usage errors (exit code 2)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which options were given
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
