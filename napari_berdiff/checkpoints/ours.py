"""Our format: one ``.safetensors`` file whose metadata carries a JSON description.

``metadata["napari_berdiff"]`` is a JSON document::

    {"format": "napari-berdiff/1", "kind": "bernoulli", "name": "...",
     "network": {"type": "unet", ...UNetConfig fields},
     "diffusion": {...DiffusionConfig fields},
     "data": {"image_size": 128, "image_channels": 1, "normalisation": {...},
              "spacing": [...], "description": "..."},
     "training": {...}, "metrics": {...}, "preset": "..."}

Reading it never executes anything from the file: the network is built from this
description and the tensors are plain data.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, corrupt
from .schema import validate_description
from .sniff import read_safetensors_header

__all__ = ["METADATA_KEY", "FORMAT", "save_model", "read_description", "tensor_shapes"]

METADATA_KEY = "napari_berdiff"
FORMAT = "napari-berdiff/1"
SECTIONS = ("data", "training", "metrics")


def _plain_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies: float tensors as float32."""
    out = {}
    for k, v in net.state_dict().items():
        t = v.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[k] = t.contiguous().clone()  # clone: breaks shared storage and views
    return out


def _json_safe(obj: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the {where} metadata cannot be written as JSON: {e}") from None


def save_model(
    model_or_net: Any,
    path: str | Path,
    *,
    diffusion: Any = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a model to one ``.safetensors`` file in the napari-berdiff format.

    Parameters
    ----------
    model_or_net
        A :class:`~napari_berdiff.model.DiffusionModel` (its ``.net``, ``.diffusion`` and
        ``.metadata`` are used) or a bare network with a ``config`` (then pass ``diffusion``).
    path
        Where to write; the parent folder must exist.
    diffusion
        A :class:`~napari_berdiff.diffusion.DiffusionConfig`, overriding the model's.
    metadata
        Extra or overriding metadata (``kind``, ``name``, ``data``, ``training``,
        ``metrics``, ``preset`` …).

    Returns
    -------
    Path
        ``path``.
    """
    from ..model import DiffusionModel

    if isinstance(model_or_net, DiffusionModel):
        net = model_or_net.net
        doc = copy.deepcopy(model_or_net.metadata)
        diffusion = diffusion or model_or_net.diffusion
    elif isinstance(model_or_net, torch.nn.Module):
        net, doc = model_or_net, {}
    else:
        raise TypeError(
            f"expected a DiffusionModel or a torch module, got {type(model_or_net).__name__}"
        )
    doc.update(copy.deepcopy(metadata or {}))
    if diffusion is not None:
        doc["diffusion"] = diffusion.to_dict() if hasattr(diffusion, "to_dict") else dict(diffusion)
    if "diffusion" not in doc:
        raise ValueError(
            "save_model needs the diffusion settings: pass diffusion=DiffusionConfig(...)"
        )
    if getattr(net, "config", None) is not None:
        from ..networks import network_to_metadata

        doc["network"] = network_to_metadata(net)
    if "network" not in doc:
        raise ValueError("the network has no config to describe it; cannot save it in our format")
    doc["format"] = FORMAT
    doc.setdefault("kind", doc["diffusion"].get("kind", "bernoulli"))
    doc.setdefault("name", Path(path).stem)
    for section in SECTIONS:
        doc.setdefault(section, {})
    data = doc["data"]
    data.setdefault("image_size", int(doc["network"].get("image_size", 0)) or None)
    channels = int(doc["network"].get("image_channels", 1))
    data.setdefault("image_channels", channels - 1 if doc["kind"] == "refiner" else channels)
    data.setdefault("normalisation", {"mode": "minmax"})

    from safetensors.torch import save_file

    path = Path(path)
    tensors = _plain_state_dict(net)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(_json_safe(doc, "model")),
                                            "format": "pt"})
    # safetensors creates the file owner-only (0600); give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def tensor_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header."""
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not isinstance(v, dict) or "shape" not in v:
            raise CheckpointError(f"the safetensors header entry {k!r} has no shape")
        out[k] = tuple(int(s) for s in v["shape"])
    return out


def read_description(
    path: str | Path, header: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Our JSON description from a safetensors file, or None when the file is foreign.

    The whole description is validated (:func:`~.schema.validate_description`): types,
    bounds and the configs' own checks, before anything is built from it.

    Raises
    ------
    CheckpointError
        For an unreadable or invalid description, or one written in a format this version
        cannot read.
    """
    p = Path(path)
    header = header if header is not None else read_safetensors_header(p)
    meta = header.get("__metadata__") or {}
    if METADATA_KEY not in meta:
        return None
    try:
        doc = json.loads(meta[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as e:
        raise corrupt(p, f"its napari_berdiff metadata is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise corrupt(p, "its napari_berdiff metadata is not a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("napari-berdiff/"):
            raise CheckpointError(
                f"{p.name} was written in format {fmt}; this version of napari-berdiff reads "
                f"{FORMAT}. Update napari-berdiff to read it."
            )
        raise CheckpointError(
            f"{p.name} has napari_berdiff metadata with format {fmt!r}; expected {FORMAT!r}"
        )
    for key in ("network", "diffusion"):
        if not isinstance(doc.get(key), dict):
            raise CheckpointError(f"{p.name}: its description has no {key!r} section")
    return validate_description(doc, p)
