"""Whole-model presets: network, diffusion and data settings of the official releases.

An official checkpoint is a bare ``state_dict``; a preset supplies everything else the
sampler needs to use it (DESIGN §4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .diffusion.config import DiffusionConfig


@dataclass(frozen=True)
class ModelPreset:
    """A named model configuration.

    Attributes
    ----------
    network
        Name of the network preset in :mod:`napari_berdiff.networks.presets`.
    kind
        ``bernoulli``, ``gaussian``, ``refiner`` or ``segmentor``.
    diffusion
        The diffusion settings the released model was trained with.
    data
        Image size, channels and intensity normalisation.
    source
        Where the weights come from, in words.
    """

    name: str
    network: str
    kind: str
    diffusion: DiffusionConfig
    data: dict[str, Any] = field(default_factory=dict)
    source: str = ""


MODEL_PRESETS: dict[str, ModelPreset] = {
    "berdiff-lidc-128": ModelPreset(
        name="berdiff-lidc-128",
        network="berdiff-lidc-128",
        kind="bernoulli",
        diffusion=DiffusionConfig(
            kind="bernoulli", timesteps=1000, schedule="cosine", prediction="eps",
            default_steps="ddimuni10",
        ),
        data={
            "image_size": 128,
            "image_channels": 1,
            "normalisation": {"mode": "unit"},
            "window": {"units": "HU", "width": 1500.0, "level": -600.0},
            "description": "LIDC-IDRI lung CT crops, 4 readers (BerDiff release)",
        },
        source="BerDiff official release (BerDiff_epsilon.pt and model*/ema_* checkpoints)",
    ),
    "wolleb-brats-256": ModelPreset(
        name="wolleb-brats-256",
        network="wolleb-brats-256",
        kind="gaussian",
        diffusion=DiffusionConfig(
            kind="gaussian", timesteps=1000, schedule="linear", prediction="eps",
            learn_sigma=True, default_steps=100, sampler="ddpm",
        ),
        data={
            "image_size": 256,
            "image_channels": 4,
            "normalisation": {"mode": "minmax"},
            "description": "BraTS MR slices, 4 modalities (Wolleb et al. release)",
        },
        source="Wolleb et al. official code (savedmodel*.pt / emasavedmodel*.pt)",
    ),
}


def get_model_preset(name: str) -> ModelPreset:
    """The :class:`ModelPreset` named ``name``; a ValueError lists the known ones."""
    try:
        return MODEL_PRESETS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(MODEL_PRESETS))
        raise ValueError(f"unknown preset {name!r}; known presets: {known}") from None
