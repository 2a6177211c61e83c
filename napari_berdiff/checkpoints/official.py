"""Official BerDiff / Wolleb / cDAL checkpoints: plain ``torch.save(state_dict)`` files.

They are read with ``torch.load(..., weights_only=True)`` only, so a file holding anything
other than tensors and plain containers is refused rather than executed. The network they
belong to is recognised from key names and shapes against the presets in
:mod:`napari_berdiff.model_presets`.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, PresetRequired, compare_keys, corrupt, key_report
from .sniff import TORCH_ZIP, sniff

__all__ = [
    "read_torch_state_dict",
    "strip_prefixes",
    "preset_shapes",
    "recognise_preset",
    "matching_presets",
    "preset_hint",
    "check_fits",
    "looks_like",
]

#: Wrappers some training scripts put around the state_dict; unwrapped when found alone.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema")
#: Prefixes added by ``nn.DataParallel``/DDP and ``torch.compile``; stripped when every key has one.
PREFIXES = ("module.", "_orig_mod.")

_CODE_HINTS = re.compile(r"GLOBAL|global|Unsupported class|blocked|allowlist")


def _refuse_code(path: Path, message: str) -> CheckpointError:
    what = re.search(r"GLOBAL ([\w.]+)", message)
    detail = f" (it refers to {what.group(1)})" if what else ""
    return CheckpointError(
        f"{path.name}: this file contains Python objects other than tensors; refusing to "
        f"load it because loading could run code{detail}. Official BerDiff and Wolleb "
        "checkpoints hold tensors only: get the file from its original source."
    )


#: Plain-data classes a checkpoint may hold besides tensors: cDAL's ``content.pth`` stores
#: its training arguments as an ``argparse.Namespace`` (attributes only, no code on load).
_DATA_CLASSES = (argparse.Namespace,)


def _torch_load(path: Path, mmap: bool = False) -> Any:
    kind = sniff(path)
    try:
        with torch.serialization.safe_globals(list(_DATA_CLASSES)):
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=mmap and kind == TORCH_ZIP
            )
    except pickle.UnpicklingError as e:
        msg = str(e)
        if _CODE_HINTS.search(msg):
            raise _refuse_code(path, msg) from None
        raise corrupt(path, "its pickled contents cannot be read") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError,
            AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise corrupt(path, first) from None


def _optimiser_error(path: Path) -> CheckpointError:
    name = path.name
    if name.startswith("optsavedmodel"):
        sib = name.replace("optsavedmodel", "savedmodel", 1)
        ema = "emasavedmodel_*" + name[len("optsavedmodel"):]
    else:
        step = name[3:] if name.startswith("opt") else "*.pt"
        sib, ema = f"model{step}", f"ema_*_{step}"
    return CheckpointError(
        f"{name} is an optimiser state (it holds 'state' and 'param_groups'), not network "
        f"weights. Pick the model file saved next to it: {sib} or the EMA weights {ema} "
        "(the EMA file usually samples best)."
    )


def _resume_generator(path: Path, content: Mapping[str, Any]) -> Mapping[str, Any]:
    """The generator of a cDAL / Denoising-Diffusion-GAN resume file (``content.pth``).

    Such a file holds ``netG_dict`` (the generator), ``netD_dict`` (the discriminator), the
    optimisers, schedulers and training arguments; only the generator samples.
    """
    gen = content["netG_dict"]
    if not isinstance(gen, Mapping) or not gen:
        raise CheckpointError(
            f"{path.name} looks like a cDAL resume file (it has 'netG_dict') but its "
            "'netG_dict' entry is not a state_dict; the generator weights should be there, "
            "or in the netG_*.pth file saved next to it."
        )
    return gen


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove a ``module.`` (DataParallel) or ``_orig_mod.`` prefix shared by every key."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def read_torch_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read an official checkpoint's tensors safely.

    Returns the state_dict with any ``module.`` prefix removed. With ``mmap=True`` the
    tensors are memory-mapped from the file (cheap when only shapes are needed).

    Raises
    ------
    CheckpointError
        For a file that holds code objects, an optimiser state, something that is not a
        state_dict, or a truncated/corrupt file.
    """
    p = Path(path)
    obj = _torch_load(p, mmap)
    if isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj:
        raise _optimiser_error(p)
    if isinstance(obj, Mapping) and "netG_dict" in obj:
        obj = _resume_generator(p, obj)
    if isinstance(obj, Mapping):
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(inner) == 1 and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[inner[0]]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{p.name} holds a {type(obj).__name__}, not a state_dict (a mapping from "
            "parameter names to tensors)"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{p.name} is not a plain state_dict: entries {', '.join(bad[:5])} are not tensors"
        )
    return strip_prefixes(obj)


# ---------------------------------------------------------------------------- presets
@functools.lru_cache(maxsize=16)
def _network_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    from ..networks import build_network

    with torch.device("meta"):
        net = build_network(config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def preset_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """Every state_dict key and shape of a model preset's network (built on the meta device)."""
    from ..model_presets import get_model_preset
    from ..networks import get_network_preset

    return _network_shapes(get_network_preset(get_model_preset(preset).network))


def _shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def matching_presets(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the model presets whose network has exactly these keys and shapes."""
    from ..model_presets import MODEL_PRESETS

    shapes = _shapes(state_dict)
    return [name for name in MODEL_PRESETS if preset_shapes(name) == shapes]


def _dim(shapes: Mapping[str, tuple[int, ...]], key: str, axis: int) -> int | None:
    shape = shapes.get(key)
    return int(shape[axis]) if shape is not None and len(shape) > axis else None


def looks_like(state_dict: Mapping[str, Any]) -> tuple[str, str | None]:
    """What a state_dict looks like, from its key names and a few shapes, and the family of
    presets that takes such files (None when no preset family fits).

    Returns ``(description, first preset of the family)``.
    """
    shapes = _shapes(state_dict)
    keys = list(shapes)
    if any(k.startswith("all_modules.") for k in keys) and any(
            k.startswith("z_transform.") for k in keys):
        nf, nz = _dim(shapes, "all_modules.0.weight", 1), _dim(shapes, "z_transform.1.weight", 1)
        img = _dim(shapes, "all_modules.2.weight", 1)
        return (f"a cDAL / Denoising-Diffusion-GAN NCSN++ generator (nf={nf}, nz={nz}, "
                f"{img} image channel(s)) with a layout none of the cdal-* presets has",
                "cdal-lung-256")
    if any(k.startswith("t_embed.main.") for k in keys) and "start_conv.weight" in keys:
        return ("a cDAL / Denoising-Diffusion-GAN discriminator, not a generator: load the "
                "generator file (netG_*.pth, or the released *_mIoU_*_F1_*.pth) instead", None)
    if any(k.startswith("input_blocks.") for k in keys) and "time_embed.0.weight" in shapes:
        mc = _dim(shapes, "time_embed.0.weight", 1)
        cin = _dim(shapes, "input_blocks.0.0.weight", 1)
        return (f"a guided-diffusion UNet (BerDiff / Wolleb layout; model_channels={mc}, "
                f"{cin} input channels) with a layout neither berdiff-lidc-128 nor "
                "wolleb-brats-256 has", "berdiff-lidc-128")
    return (f"not a network napari-berdiff knows (its first keys: {', '.join(keys[:3])})", None)


def preset_hint(state_dict: Mapping[str, Any] | None = None) -> str:
    """How to pass a preset; with a state_dict, first what the file looks like."""
    from ..model_presets import MODEL_PRESETS

    names = ", ".join(MODEL_PRESETS)
    if state_dict is not None:
        what, family = looks_like(state_dict)
        if family is None:
            return f"it looks like {what}. Known presets: {names}"
        return (f"it looks like {what}. Known presets: {names}; pass one with "
                f"preset={family!r} in Python or --preset {family} on the command line "
                "if it is a variant that should fit")
    first = next(iter(MODEL_PRESETS), "berdiff-lidc-128")
    return (f"known presets: {names}. Pass one with preset={first!r} in Python or "
            f"--preset {first} on the command line")


def recognise_preset(state_dict: Mapping[str, Any], name: str = "this file") -> str:
    """The one preset whose network fits ``state_dict`` exactly.

    Raises
    ------
    CheckpointError
        When no preset or several presets fit, listing them and saying how to pass one.
    """
    found = matching_presets(state_dict)
    if len(found) == 1:
        return found[0]
    if found:
        raise PresetRequired(
            f"{name} fits several presets ({', '.join(found)}); say which one: "
            + preset_hint()
        )
    n = sum(int(v.numel()) for v in state_dict.values())
    raise PresetRequired(
        f"{name} ({len(state_dict)} tensors, {n:,} parameters) matches no known preset; "
        + preset_hint(state_dict)
    )


def check_fits(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Any],
               what: str) -> None:
    """Raise a :class:`CheckpointError` naming every missing, unexpected or mis-shaped key."""
    missing, unexpected, mismatched = compare_keys(expected, _shapes(state_dict))
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"the weights do not fit {what}:\n  " + key_report(missing, unexpected, mismatched)
        )
