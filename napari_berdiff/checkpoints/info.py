"""Describing checkpoint files (``berdiff info``) and finding the bundled models."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .official import check_fits, matching_presets, preset_shapes, read_torch_state_dict
from .ours import FORMAT, read_description, tensor_shapes
from .sniff import SAFETENSORS, TORCH_LEGACY, read_safetensors_header, sha256_of, sniff

__all__ = ["DEFAULT_MODEL", "describe", "list_bundled_models"]

#: The bundled model the demo and the widget offer first.
DEFAULT_MODEL = "berdiff-lidc-semireal-64"


def _preset_description(preset: str) -> dict[str, Any]:
    from ..model_presets import get_model_preset
    from ..networks import get_network_preset, network_description

    mp = get_model_preset(preset)
    return {
        "kind": mp.kind,
        "name": mp.name,
        "preset": mp.name,
        "network": network_description(get_network_preset(mp.network)),
        "diffusion": mp.diffusion.to_dict(),
        "data": dict(mp.data),
        "training": {"source": mp.source},
        "metrics": {},
    }


def describe(
    path: str | Path, preset: str | None = None, *, checksum: bool = True,
    verify: bool = False,
) -> dict[str, Any]:
    """What a checkpoint is; with ``verify``, also whether it works.

    Without ``verify`` only the header (or the pickle's tensor table) is read and no network
    is built. With ``verify`` every tensor is read and checked for NaN and infinity and, when
    the network is known (our files, or an official file whose preset is named or
    recognised), the model is loaded exactly as :func:`load_model` loads it; then
    ``verified`` holds what was checked.

    Returns a JSON-friendly dict: ``file``, ``file_format``, ``size_bytes``, ``sha256``,
    ``kind``, ``name``, ``preset``, ``architecture`` (the network description),
    ``parameters``, ``tensors``, ``diffusion``, ``data``, ``training``, ``metrics``,
    ``verified`` (with ``verify``) and, for an official file no preset fits, a ``note``.

    Raises
    ------
    CheckpointError
        As :func:`~napari_berdiff.checkpoints.load_model` does for unreadable files.
    """
    p = Path(path)
    kind = sniff(p)
    out: dict[str, Any] = {"file": str(p), "size_bytes": p.stat().st_size}
    if kind == SAFETENSORS:
        header = read_safetensors_header(p)
        shapes = tensor_shapes(header)
        doc = read_description(p, header)
        if doc is None:
            if preset is None:
                from .loading import foreign_error

                raise foreign_error(p)
            check_fits(preset_shapes(preset), shapes_as_sd(shapes), f"preset {preset!r}")
            doc = _preset_description(preset)
            out["file_format"] = "safetensors (not written by napari-berdiff)"
        else:
            out["file_format"] = f"{FORMAT} (safetensors)"
    else:
        sd = read_torch_state_dict(p, mmap=True)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        flavour = "legacy pickle" if kind == TORCH_LEGACY else "zip"
        out["file_format"] = f"official PyTorch state_dict (torch.save, {flavour})"
        if preset is None:
            found = matching_presets(sd)
            preset = found[0] if len(found) == 1 else None
            if preset is None:
                from .official import preset_hint

                out["note"] = (f"no known preset fits this file's keys and shapes; "
                               f"{preset_hint(sd)}" if not found else
                               f"several presets fit: {', '.join(found)}")
        else:
            check_fits(preset_shapes(preset), sd, f"preset {preset!r}")
        doc = _preset_description(preset) if preset else {"kind": "unknown"}
    out.update({
        "kind": doc.get("kind"),
        "name": doc.get("name", ""),
        "preset": doc.get("preset"),
        "architecture": doc.get("network"),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "tensors": len(shapes),
        "diffusion": doc.get("diffusion"),
        "data": doc.get("data", {}),
        "training": doc.get("training", {}),
        "metrics": doc.get("metrics", {}),
    })
    if verify:
        out["verified"] = _verify(p, preset, known=doc.get("network") is not None)
    if checksum:
        out["sha256"] = sha256_of(p)
    return out


def _verify(p: Path, preset: str | None, known: bool) -> str:
    """Read every tensor and, when the network is known, load the model as ``load_model``
    does; returns what was checked (raises :class:`CheckpointError` on a problem)."""
    from .loading import check_finite, load_model, load_state_dict_file

    if known:
        model = load_model(p, preset=preset, device="cpu")
        return (f"every tensor read, finite, and loaded into the described network "
                f"({model.num_parameters():,} parameters)")
    check_finite(load_state_dict_file(p), p)
    return "every tensor read and finite; no network to load it into (name a --preset)"


class _Shaped:
    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def shapes_as_sd(shapes: dict[str, tuple[int, ...]]) -> dict[str, _Shaped]:
    return {k: _Shaped(v) for k, v in shapes.items()}


def list_bundled_models() -> list[Path]:
    """The ``*.safetensors`` files shipped in ``models/`` (in the repository) or in
    ``napari_berdiff/models/``, :data:`DEFAULT_MODEL` first, then by name; an empty list when
    there are none."""
    import napari_berdiff

    pkg = Path(napari_berdiff.__file__).resolve().parent
    found: list[Path] = []
    for folder in (pkg.parent / "models", pkg / "models"):
        if folder.is_dir():
            found.extend(sorted(folder.glob("*.safetensors")))
    seen: set[Path] = set()
    unique = [f for f in found if not (f in seen or seen.add(f))]
    return sorted(unique, key=lambda f: f.name.split(".")[0] != DEFAULT_MODEL)

