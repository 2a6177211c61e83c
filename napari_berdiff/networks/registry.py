"""Network types by name, so a checkpoint's metadata can rebuild its network.

A network is described as ``{"type": NAME, **config.to_dict()}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .condition_once import CondOnceConfig, ConditionOnceNet
from .ncsnpp import NCSNppConfig, NCSNppGenerator
from .unet import ConditionalUNet, UNetConfig

NETWORK_TYPES: dict[str, tuple[type, type[nn.Module]]] = {
    "unet": (UNetConfig, ConditionalUNet),
    "condition_once": (CondOnceConfig, ConditionOnceNet),
    "ncsnpp_adagn": (NCSNppConfig, NCSNppGenerator),
}


def network_to_metadata(net: nn.Module) -> dict[str, Any]:
    """``{"type": ..., **config}`` for a network of a registered type."""
    for name, (_, cls) in NETWORK_TYPES.items():
        if type(net) is cls:
            return {"type": name, **net.config.to_dict()}
    raise ValueError(f"{type(net).__name__} is not a registered network type")


def network_description(config: Any) -> dict[str, Any]:
    """``{"type": ..., **config}`` for the config object of a registered network type."""
    for name, (config_cls, _) in NETWORK_TYPES.items():
        if type(config) is config_cls:
            return {"type": name, **config.to_dict()}
    raise ValueError(f"{type(config).__name__} is not the config of a registered network type")


def network_config_from_metadata(desc: dict[str, Any]) -> Any:
    """The config object a metadata description names (``type`` defaults to ``unet``)."""
    d = dict(desc)
    kind = d.pop("type", "unet")
    if kind not in NETWORK_TYPES:
        raise ValueError(
            f"unknown network type {kind!r}; known types: {', '.join(sorted(NETWORK_TYPES))}"
        )
    return NETWORK_TYPES[kind][0].from_dict(d)


def network_from_metadata(desc: dict[str, Any]) -> nn.Module:
    """Build a (randomly initialised) network from its metadata description."""
    config = network_config_from_metadata(desc)
    net_cls = next(cls for cfg_cls, cls in NETWORK_TYPES.values() if type(config) is cfg_cls)
    return net_cls(config)
