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


def test_lidc_nodule_sample_opens_rendered_ct_and_the_readers_real_contours(
        make_napari_viewer):
    from napari_berdiff.data.lidc import demo_slice

    viewer = make_napari_viewer()
    viewer.open_sample("napari-berdiff", "lidc_nodule")
    image = viewer.layers["nodule CT (rendered)"]
    assert image.data.shape == (128, 128) and tuple(image.scale) == (0.5, 0.5)  # mm
    readers = [lay for lay in viewer.layers if lay.name.startswith("LIDC readers")]
    assert readers, [lay.name for lay in viewer.layers]
    masks = np.concatenate([np.asarray(lay.data).reshape(-1, 128, 128) for lay in readers])
    item = demo_slice()
    expect = item.masks[:, 26:154, 26:154] > 0  # the central 128 of the 180 crop
    assert np.array_equal(np.sort((masks > 0).reshape(len(masks), -1).sum(1)),
                          np.sort(expect.reshape(4, -1).sum(1)))
    assert image.metadata["lidc"]["contours"].startswith("real")


def test_the_demo_opens_the_sample_its_model_was_trained_on():
    from types import SimpleNamespace

    from napari_berdiff.demo import is_lidc_model

    lidc = SimpleNamespace(data={"description": "semi-real LIDC-IDRI, train split"})
    phantom = SimpleNamespace(data={"description": "synthetic CT-like phantoms 64x64"})
    assert is_lidc_model(lidc) and not is_lidc_model(phantom)
    assert not is_lidc_model(SimpleNamespace())


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
