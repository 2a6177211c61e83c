"""The sample data and `python -m napari_berdiff.demo --screenshot` (under the same Xvfb)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np


def test_phantom_sample_opens_image_and_annotators(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-berdiff", "phantom")
    names = [lay.name for lay in layers]
    assert names == ["phantom", "annotators"]
    image, annot = viewer.layers["phantom"], viewer.layers["annotators"]
    assert image.data.shape == (128, 128) and image.data.dtype == np.float32
    assert annot.data.ndim == 3 and annot.data.shape[1:] == (128, 128)  # K on a leading axis
    assert annot.data.shape[0] == 4 and annot.data.dtype == np.uint8


def test_demo_screenshot_writes_a_png(tmp_path):
    out = tmp_path / "demo.png"
    env = dict(os.environ)
    env.pop("QT_QPA_PLATFORM", None)  # offscreen crashes napari; pytest-xvfb set DISPLAY
    proc = subprocess.run(
        [sys.executable, "-m", "napari_berdiff.demo", "--screenshot", str(out),
         "--samples", "2", "--steps", "2", "--timeout", "400"],
        env=env, capture_output=True, text=True, timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
