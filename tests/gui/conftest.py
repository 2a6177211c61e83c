"""Fixtures for the GUI tests: tiny models, the docked widget, notification capture.

The tests run under Xvfb (pytest-xvfb starts it); QT_QPA_PLATFORM stays unset because
offscreen Qt crashes napari's first Image layer.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel

WIDGET = ("napari-berdiff", "Diffusion segmentation")


def tiny_unet_model(steps: int = 4, channels: int = 1, size: int = 32) -> DiffusionModel:
    """The real conditional UNet, as small as it gets (untrained)."""
    from napari_berdiff.networks.presets import build_network, tiny_config

    torch.manual_seed(0)
    net = build_network(tiny_config(image_size=size, model_channels=8, norm_groups=8,
                                    image_channels=channels))
    cfg = DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=steps)
    return DiffusionModel(net, cfg, {"name": "tiny", "data": {"image_size": size}})


class ToyNet(nn.Module):
    """An x0-mode stand-in whose samples are non-trivial: a noisy threshold of the image.

    It depends on x_t, so the N samples differ; ``calls`` counts forward passes and
    ``delay`` slows each one down (for cancel and close tests).
    """

    def __init__(self, channels: int = 1, size: int = 32, delay: float = 0.0):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.config = SimpleNamespace(image_channels=channels, image_size=size)
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        img = cond.mean(1, keepdim=True)
        logits = 8.0 * (img - 0.5) + 3.0 * (x_t.float() - 0.5)
        return torch.sigmoid(self.gain * logits).expand_as(x_t)


def toy_model(steps: int = 4, channels: int = 1, size: int = 32, delay: float = 0.0
              ) -> DiffusionModel:
    cfg = DiffusionConfig(kind="bernoulli", timesteps=max(100, steps), default_steps=steps,
                          prediction="x0")
    return DiffusionModel(ToyNet(channels, size, delay), cfg,
                          {"name": "toy", "network": {"type": "toy"}, "data": {"image_size": size}})


def blob(h: int = 32, w: int = 32, centre=None, radius: float = 8.0, seed: int = 0
         ) -> np.ndarray:
    """A bright disk on a darker noisy background, float32."""
    cy, cx = centre if centre is not None else (h / 2, w / 2)
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    img = 0.2 + 0.6 * (((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2)
    return (img + rng.normal(0, 0.08, (h, w))).astype(np.float32)


@pytest.fixture
def docked(make_napari_viewer):
    """A viewer with the widget docked from the manifest, as a user opens it."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(*WIDGET)
    return viewer, widget


@pytest.fixture
def notes():
    """New napari notifications since the test started: ``notes()`` → [(severity, text)]."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    def _new(severity: str | None = None) -> list[tuple[str, str]]:
        out = [(str(n.severity), str(n.message)) for n in notification_manager.records[start:]]
        if severity is not None:
            out = [o for o in out if o[0].lower() == severity]
        return out

    return _new


def run_and_wait(qtbot, widget, timeout: int = 60_000):
    """Start a run from the widget and wait until it has finished; returns its Outcome."""
    got = {}
    widget.run_finished.connect(lambda o: got.setdefault("outcome", o))
    worker = widget.sample()
    assert worker is not None, "the run did not start"
    qtbot.waitUntil(lambda: "outcome" in got and not widget.running, timeout=timeout)
    return got["outcome"]
