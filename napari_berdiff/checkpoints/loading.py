"""``load_model``: our ``.safetensors`` files and official ``.pt`` state_dicts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, corrupt, short_list
from .official import (
    check_fits,
    matching_presets,
    preset_hint,
    read_torch_state_dict,
    recognise_preset,
)
from .ours import FORMAT, METADATA_KEY, read_description
from .schema import check_network_size
from .sniff import SAFETENSORS, read_safetensors_header, sniff

__all__ = ["load_model", "load_state_dict_file", "network_from_description", "foreign_error",
           "check_finite"]


def foreign_error(path: Path) -> CheckpointError:
    from .info import shapes_as_sd
    from .official import strip_prefixes
    from .ours import tensor_shapes

    try:  # what its tensors look like, from the header alone
        hint = preset_hint(strip_prefixes(shapes_as_sd(tensor_shapes(
            read_safetensors_header(path)))))
    except CheckpointError:
        hint = preset_hint()
    return CheckpointError(
        f"{path.name} is a safetensors file that was not written by napari-berdiff: its "
        f"metadata has no {METADATA_KEY!r} entry (expected a JSON description with format "
        f"{FORMAT!r}). If it holds an official BerDiff/Wolleb/cDAL state_dict, pass its "
        f"preset; {hint}."
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError and friends: the file does not parse
        raise corrupt(path, str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None


def check_finite(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinity, naming the tensors (a network with such
    weights gives NaN probabilities, or all-empty masks through a presence head)."""
    bad = [k for k, v in state_dict.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path.name}: {len(bad)} tensor(s) hold NaN or infinite weights: "
            f"{short_list(bad)}. The file is damaged, or its training diverged; use another "
            "checkpoint."
        )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of any checkpoint file (ours, foreign safetensors or official ``.pt``)."""
    p = Path(path)
    if sniff(p) == SAFETENSORS:
        return _read_safetensors(p)
    return read_torch_state_dict(p)


def network_from_description(network: Mapping[str, Any]) -> torch.nn.Module:
    """Build (on the meta device: no memory, no initialisation) the network a description names."""
    from ..networks import NETWORK_TYPES, network_from_metadata

    kind = dict(network).get("type")
    if kind not in NETWORK_TYPES:
        raise CheckpointError(
            f"unknown network type {kind!r}; this version of napari-berdiff knows: "
            f"{', '.join(sorted(NETWORK_TYPES))}"
        )
    try:
        with torch.device("meta"):
            return network_from_metadata(network)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the network description is invalid: {e}") from None


def _own(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` as a CPU tensor of ``like``'s dtype that owns all of its (contiguous) storage."""
    t = t.detach()
    if t.dtype != like.dtype or t.device.type != "cpu":
        return t.to(device="cpu", dtype=like.dtype).contiguous()
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if t.is_contiguous() and t.storage_offset() == 0 and whole:
        return t
    return t.contiguous().clone()


def _materialise(net: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                 config: Any) -> torch.nn.Module:
    """Check the keys and shapes, then put the weights into the (meta-built) network, strictly.

    The file's tensors become the parameters (no second copy) when they are float32 CPU
    tensors owning their storage; anything else is converted or copied first.
    """
    expected = net.state_dict()
    check_fits({k: tuple(v.shape) for k, v in expected.items()}, state_dict, what)
    if any(name not in expected for name, _ in net.named_buffers()):
        # Non-persistent buffers are computed at construction: build for real and copy.
        from ..networks import build_network

        net = build_network(config)
        net.load_state_dict(state_dict, strict=True)
        return net
    owned = {k: _own(v, expected[k]) for k, v in state_dict.items()}
    net.load_state_dict(owned, strict=True, assign=True)
    return net


def _from_description(doc: dict[str, Any], path: Path, device: Any):
    from ..diffusion import DiffusionConfig
    from ..model import DiffusionModel

    net = network_from_description(doc["network"])
    check_network_size(net, path)
    try:
        diffusion = DiffusionConfig.from_dict(doc["diffusion"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: the diffusion description is invalid: {e}") from None
    sd = _read_safetensors(path)
    check_finite(sd, path)
    net = _materialise(net, sd, f"the network described in {path.name}", net.config)
    return DiffusionModel(net, diffusion, doc).to(device)


def _from_preset(sd: dict[str, torch.Tensor], preset: str, path: Path, device: Any):
    from ..model import DiffusionModel
    from ..model_presets import get_model_preset
    from ..networks import build_network, get_network_preset

    check_finite(sd, path)
    mp = get_model_preset(preset)
    config = get_network_preset(mp.network)
    with torch.device("meta"):
        net = build_network(config)
    try:
        net = _materialise(net, sd, f"preset {preset!r}", config)
    except CheckpointError as e:
        fits = [p for p in matching_presets(sd) if p != preset]
        extra = (f"\n  {path.name} fits preset {fits[0]!r}: use that one." if fits
                 else f"\n  No known preset fits {path.name}; {preset_hint(sd)}.")
        raise CheckpointError(f"{path.name}: {e}{extra}") from None
    meta = {
        "kind": mp.kind,
        "name": mp.name,
        "preset": mp.name,
        "data": dict(mp.data),
        "training": {"source": mp.source},
        "source_file": path.name,
    }
    return DiffusionModel(net, mp.diffusion, meta).to(device)


def load_model(path: str | Path, preset: str | None = None, device: Any = "cpu"):
    """Load a checkpoint as a :class:`~napari_berdiff.model.DiffusionModel`.

    Parameters
    ----------
    path
        A napari-berdiff ``.safetensors`` file, or an official BerDiff / Wolleb
        ``torch.save(state_dict)`` file (``BerDiff_epsilon.pt``, ``model*.pt``,
        ``ema_*.pt``, ``savedmodel*.pt``, ``emasavedmodel*.pt``), or a cDAL generator
        (``*_mIoU_*_F1_*.pth``, ``netG_*.pth``, keys ``module.…``) or resume file
        (``content.pth``, whose generator ``netG_dict`` is loaded).
    preset
        For official files (and safetensors files written by other tools): the model
        preset, e.g. ``"berdiff-lidc-128"``. Recognised from the keys and shapes when
        omitted. Ignored for our own files, which describe themselves.
    device
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.

    Raises
    ------
    CheckpointError
        (a ``ValueError``) for anything wrong with the file, with a message for people.
    """
    model = _load(Path(path), preset, device)
    model.source_path = str(Path(path).resolve())  # provenance: which file made a mask
    return model


def _load(p: Path, preset: str | None, device: Any):
    if sniff(p) == SAFETENSORS:
        doc = read_description(p, read_safetensors_header(p))
        if doc is not None:
            return _from_description(doc, p, device)
        if preset is None:
            raise foreign_error(p)
        sd = _read_safetensors(p)
    else:
        sd = read_torch_state_dict(p)
        if preset is None:
            preset = recognise_preset(sd, p.name)
    return _from_preset(sd, preset, p, device)
