"""The out-of-distribution notice: a model's training statistics, and the notice for images
unlike them (an MR slice against CT-trained models), never for in-distribution images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_berdiff.data.layout import center_crop
from napari_berdiff.data.lidc import load_lidc_readers
from napari_berdiff.data.lidc_render import render_slice
from napari_berdiff.distribution import (PHANTOM_STATS_FILE, derive_phantom_stats,
                                         intensity_stats, model_spacing)
from napari_berdiff.model import normalise_image

from .ckpt_helpers import one_torch_thread, tiny_model  # noqa: F401 (autouse fixture)

pydicom_data = pytest.importorskip("pydicom.data")
MODELS = Path(__file__).resolve().parents[2] / "models"


def _mr() -> tuple[np.ndarray, tuple]:
    from napari_berdiff.imageio import read_image

    arr, info = read_image(pydicom_data.get_testdata_file("MR_small.dcm"))
    return arr, info["spacing"]


def _rendered(split: str, stride: int, count: int) -> list[np.ndarray]:
    """Central 128×128 of rendered items, one per nodule at a stride (seed 0)."""
    lidc = load_lidc_readers()
    nods = lidc.nodules(split)[::stride][:count]
    out = []
    for n in nods:
        items = list(lidc.nodule_slices(n))
        out.append(center_crop(render_slice(items[len(items) // 2], 0)["image"], 128))
    return out


@pytest.fixture(scope="module")
def ct_model_data():
    imgs = [normalise_image(im[None], {"mode": "minmax"}) for im in _rendered("train", 80, 24)]
    return {"image_size": 128, "image_channels": 1, "normalisation": {"mode": "minmax"},
            "spacing": [0.5, 0.5], "intensity_stats": intensity_stats(imgs),
            "description": "rendered semi-real LIDC (test)"}


def test_notice_for_an_mr_slice_and_not_for_rendered_ct(ct_model_data):
    model = tiny_model(data=ct_model_data)
    mr, mr_spacing = _mr()
    notice = model.input_notice(mr)  # spacing unknown: the intensities alone
    assert notice and "unlikely to be meaningful" in notice
    assert "after normalisation differ" in notice
    assert "pixel spacing 0.312 mm" not in notice
    with_spacing = model.input_notice(mr, spacing=mr_spacing)
    assert "its pixel spacing is 0.312 mm while the model was trained at 0.5 mm" in with_spacing
    for img in _rendered("val", 60, 4):  # other patients than the statistics'
        assert model.input_notice(img, spacing=(0.5, 0.5)) is None
        # the same CT read as 16-bit integers: unit scaling, same notice (none)
        assert model.input_notice((img * 255).astype(np.uint8)) is None


def test_notice_in_the_cli_and_run_json(ct_model_data, tmp_path, capsys):
    from PIL import Image

    from napari_berdiff.checkpoints import save_model
    from napari_berdiff.cli import main

    path = save_model(tiny_model(data=ct_model_data), tmp_path / "ct.safetensors")
    ct = tmp_path / "ct.png"
    Image.fromarray(np.round(_rendered("val", 60, 1)[0] * 255).astype(np.uint8)).save(ct)
    common = ["sample", "--model", str(path), "--n", "1", "--steps", "1", "--device", "cpu",
              "--allow-large", "--quiet"]
    assert main(common + ["--image", pydicom_data.get_testdata_file("MR_small.dcm"),
                          "--out", str(tmp_path / "mr")]) == 0
    err = capsys.readouterr().err
    assert "unlikely to be meaningful" in err and "Sampling anyway" in err
    run = json.loads((tmp_path / "mr" / "run.json").read_text())
    assert "unlikely to be meaningful" in run["input_notice"]
    assert main(common + ["--image", str(ct), "--out", str(tmp_path / "ct")]) == 0
    assert "unlikely" not in capsys.readouterr().err
    assert json.loads((tmp_path / "ct" / "run.json").read_text())["input_notice"] is None


def test_bundled_phantom_models_get_statistics_and_spacing_from_the_generator():
    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.data.phantoms import make_phantom

    model = load_model(MODELS / "berdiff-phantom-64.safetensors")
    assert "intensity_stats" not in model.data  # predates them: derived, not retrained
    assert model_spacing(model.data) == pytest.approx(1.0)
    assert "unlikely to be meaningful" in model.input_notice(_mr()[0])
    for seed in (70_001, 70_002, 70_003):  # held-out phantoms
        assert model.input_notice(make_phantom(seed, 64).image) is None


def test_stored_phantom_statistics_equal_a_fresh_derivation():
    stored = json.loads(PHANTOM_STATS_FILE.read_text())["64"]
    fresh = derive_phantom_stats(64)
    assert stored["features"] == fresh["features"] and stored["n_images"] == fresh["n_images"]
    np.testing.assert_allclose(stored["mean"], fresh["mean"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stored["cov"], fresh["cov"], rtol=1e-5, atol=1e-10)
    assert stored["limit"] == pytest.approx(fresh["limit"], abs=1e-3)
