"""Networks: the conditional UNet in the official BerDiff / Wolleb state-dict layout, and
cDAL's NCSN++ generator in its official layout.

Torch only — nothing here imports Qt or napari.
"""

from __future__ import annotations

from .blocks import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    qkv_attention,
    timestep_embedding,
)
from .presets import (
    NETWORK_PRESETS,
    build_network,
    get_network_preset,
    official_attention_ds,
    tiny_config,
)
from .condition_once import CondOnceConfig, ConditionOnceNet
from .ncsnpp import NCSNppConfig, NCSNppGenerator
from .registry import (
    NETWORK_TYPES,
    network_description,
    network_from_metadata,
    network_to_metadata,
)
from .unet import ConditionalUNet, UNetConfig

__all__ = [
    "AttentionBlock",
    "CondOnceConfig",
    "ConditionOnceNet",
    "ConditionalUNet",
    "Downsample",
    "GroupNorm32",
    "NCSNppConfig",
    "NCSNppGenerator",
    "NETWORK_PRESETS",
    "NETWORK_TYPES",
    "ResBlock",
    "TimestepEmbedSequential",
    "UNetConfig",
    "Upsample",
    "build_network",
    "get_network_preset",
    "network_description",
    "network_from_metadata",
    "network_to_metadata",
    "official_attention_ds",
    "qkv_attention",
    "timestep_embedding",
    "tiny_config",
]
