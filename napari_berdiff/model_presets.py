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
    # cDAL (github.com/Hejrati/cDAL): torch.save of the DDP-wrapped generator, keys
    # 'module.…', file names carrying the validation mIoU and F1. The lung data stores the
    # lungs as -1, so the kernel reads x̂0 < 0 as foreground.
    "cdal-lung-256": ModelPreset(
        name="cdal-lung-256",
        network="cdal-lung-256",
        kind="cdal",
        diffusion=DiffusionConfig(kind="cdal", timesteps=2, schedule="vp", prediction="x0",
                                  default_steps=2, inverted_masks=True),
        data={
            "image_size": 256,
            "image_channels": 1,
            "normalisation": {"mode": "unit", "range": [-1.0, 1.0]},
            "mask_polarity": "inverted (lungs are -1 in the chain)",
            "consensus": "majority vote of 30 samples",
            "description": "chest X-ray lung fields, 256x256 (cDAL release, lung_fold*_mIoU_*.pth)",
        },
        source="cDAL official release (saved_models/lung_fold*_mIoU_*_F1_*.pth)",
    ),
    "cdal-monu-256": ModelPreset(
        name="cdal-monu-256",
        network="cdal-monu-256",
        kind="cdal",
        diffusion=DiffusionConfig(kind="cdal", timesteps=4, schedule="vp", prediction="x0",
                                  default_steps=4),
        data={
            "image_size": 256,
            "image_channels": 3,
            "normalisation": {"mode": "standardise", "mean": [142.07, 98.48, 132.96],
                              "std": [65.78, 57.05, 57.78]},
            "consensus": "majority vote of 5 samples",
            "description": "MoNuSeg H&E nuclei, 256x256 RGB patches (cDAL release, "
                           "monu_mIoU_*.pth)",
        },
        source="cDAL official release (saved_models/monu_mIoU_*_F1_*.pth)",
    ),
    "cdal-hippo-32": ModelPreset(
        name="cdal-hippo-32",
        network="cdal-hippo-32",
        kind="cdal",
        diffusion=DiffusionConfig(kind="cdal", timesteps=4, schedule="vp", prediction="x0",
                                  default_steps=4, inverted_masks=True),
        data={
            "image_size": 32,
            "image_channels": 1,
            "normalisation": {"mode": "minmax", "range": [-1.0, 1.0]},
            "mask_polarity": "one-hot in [-1, 1]; foreground is 'not background' (channel 0 < 0)",
            "description": "hippocampus MR slices, 32x32 (cDAL train_cDAL_hippo.py configuration)",
        },
        source="cDAL official code (train_cDAL_hippo.py; no hippocampus weights are released)",
    ),
}


def get_model_preset(name: str) -> ModelPreset:
    """The :class:`ModelPreset` named ``name``; a ValueError lists the known ones."""
    try:
        return MODEL_PRESETS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(MODEL_PRESETS))
        raise ValueError(f"unknown preset {name!r}; known presets: {known}") from None
