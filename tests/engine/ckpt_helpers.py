"""Helpers for the checkpoint, image I/O and command-line tests: tiny models and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel
from napari_berdiff.model_presets import MODEL_PRESETS, ModelPreset
from napari_berdiff.networks import NETWORK_PRESETS, build_network, tiny_config

TINY_PRESET = "tiny-test"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run tiny networks on one thread: on a busy 2-core machine a second intra-op thread
    makes a 16-px forward pass up to 50 times slower (OpenMP threads waiting for a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_diffusion() -> DiffusionConfig:
    return DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=3)


def tiny_model(seed: int = 0, image_channels: int = 1, **metadata) -> DiffusionModel:
    """A 16-px, two-level UNet with random (non-zero) weights, as a DiffusionModel."""
    torch.manual_seed(seed)
    net = build_network(tiny_config(image_channels=image_channels))
    with torch.no_grad():  # the official init zeroes some convs; make every tensor distinct
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    meta = {"name": "tiny", "data": {"description": "random weights for tests"}, **metadata}
    return DiffusionModel(net, tiny_diffusion(), meta)


def register_tiny_preset(monkeypatch, name: str = TINY_PRESET) -> str:
    """Register the tiny network as a model preset for the duration of a test."""
    monkeypatch.setitem(NETWORK_PRESETS, name, tiny_config())
    monkeypatch.setitem(
        MODEL_PRESETS,
        name,
        ModelPreset(
            name=name, network=name, kind="bernoulli", diffusion=tiny_diffusion(),
            data={"image_size": 16, "image_channels": 1, "normalisation": {"mode": "minmax"},
                  "description": "tiny test preset"},
            source="tests",
        ),
    )
    return name


class CreateFileOnLoad:
    """Pickles to a call of ``open(marker, "w")``: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def random_preset_state_dict(
    preset: str, seed: int = 0, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Random tensors with exactly a preset network's keys and shapes (no network is built)."""
    from napari_berdiff.checkpoints.official import preset_shapes

    gen = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.rand(shape, generator=gen) - 0.5
            for k, shape in preset_shapes(preset).items()}


def plain_state_dict(model: DiffusionModel, prefix: str = "") -> dict[str, torch.Tensor]:
    """What the official code writes: a state_dict of contiguous CPU tensors."""
    return {prefix + k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
