"""Physical pixel spacing: recorded in dataset.json and models, read from NIfTI headers and
--spacing, and sampling at the model's spacing maps the masks back onto the right pixels."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel
from napari_berdiff.spacing import sample_at_spacing, spacing_of, zoom_factor

from .ckpt_helpers import one_torch_thread  # noqa: F401 (autouse fixture)


class ImageIsX0(nn.Module):
    """Predicts x̂0 = the (normalised) image, sharpened: the samples converge to the bright
    region, wherever it is."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(12.0))
        self.config = SimpleNamespace(image_channels=1, image_size=32)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gain * (cond[:, :1] - 0.5)).expand_as(x_t)


def _model(spacing=(1.0, 1.0)) -> DiffusionModel:
    cfg = DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=4, prediction="x0")
    data = {"image_size": 32, "normalisation": {"mode": "minmax"}}
    if spacing is not None:
        data["spacing"] = list(spacing)
    return DiffusionModel(ImageIsX0(), cfg, {"name": "x0", "network": {"type": "toy"},
                                             "data": data})


def _scene(size: int) -> np.ndarray:
    """An off-centre disk in a 64 mm field of view, at ``size`` pixels."""
    c = (np.arange(size) + 0.5) * 64.0 / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return (((yy - 20.0) ** 2 + (xx - 41.0) ** 2) < 9.0 ** 2).astype(np.float32) * 0.8 + 0.1


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_spacing_helpers():
    assert spacing_of(None) is None and spacing_of([0.5, 0.5]) == 0.5
    assert spacing_of((3.0, 0.7, 0.7)) == pytest.approx(0.7)  # z, y, x: in-plane only
    assert spacing_of([0, 1]) is None
    assert zoom_factor([0.5, 0.5], [1.0, 1.0]) == 0.5
    assert zoom_factor(1.02, 1.0) is None  # within tolerance: no resampling
    assert zoom_factor(None, 1.0) is None and zoom_factor(0.5, None) is None


def test_resampling_maps_the_masks_back_onto_the_right_pixels():
    model = _model()
    image = _scene(128)  # 0.5 mm pixels; the model works at 1 mm (64 px)
    truth = image > 0.5
    res = sample_at_spacing(model, image, (0.5, 0.5), n=3, steps=4, seed=0)
    assert res.timings["zoom"] == 0.5
    assert res.masks.shape == (3, 128, 128) and res.probs.shape == (3, 128, 128)
    assert res.roi == (0, 0, 128, 128)
    for m in res.masks:
        assert _iou(m > 0, truth) > 0.9
    # a region of interest is resampled on its own and returned in its place
    roi = (8, 48, 72, 120)
    res = sample_at_spacing(model, image, 0.5, n=2, steps=4, seed=0, roi=roi)
    assert res.roi == roi and res.masks.shape == (2, 64, 72)
    assert _iou(res.masks[0] > 0, truth[8:72, 48:120]) > 0.9
    # unknown spacing (or the model's): exactly sample_all
    plain = model.sample_all(image, 2, 4, 0)
    for sp in (None, (1.0, 1.0)):
        same = sample_at_spacing(model, image, sp, n=2, steps=4, seed=0)
        np.testing.assert_array_equal(same.masks, plain.masks)


def test_phantom_spacing_round_trips_through_dataset_json(tmp_path):
    from napari_berdiff.cli import main
    from napari_berdiff.data.layout import load_dataset

    assert main(["data", "phantoms", "--out", str(tmp_path / "p"), "--cases", "2",
                 "--size", "32"]) == 0
    assert json.loads((tmp_path / "p" / "dataset.json").read_text())["spacing"] == [2.0, 2.0]
    assert load_dataset(tmp_path / "p").description["spacing"] == [2.0, 2.0]


def test_cli_sample_resamples_a_nifti_by_its_header(tmp_path, capsys, monkeypatch):
    nib = pytest.importorskip("nibabel")
    import napari_berdiff.checkpoints as ckpt
    from napari_berdiff.cli import main

    # the toy network is not a registered type: the CLI loads it through a stand-in loader
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"toy")
    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: _model())
    image = _scene(128)
    nii = tmp_path / "scene.nii.gz"
    # NIfTI stores x, y: the array (rows, cols) is written transposed as the readers expect
    img = nib.Nifti1Image(image.T[:, :, None], np.diag([0.5, 0.5, 2.0, 1.0]))
    nib.save(img, nii)
    from napari_berdiff.imageio import read_image

    arr, info = read_image(nii)
    assert tuple(info["spacing"])[-2:] == (0.5, 0.5)
    out = tmp_path / "o"
    assert main(["sample", "--model", str(path), "--image", str(nii), "--n", "2", "--steps", "4",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "resampling the region from 0.5 mm to the model's 1 mm" in err
    run = json.loads((out / "run.json").read_text())
    assert run["resampled_zoom"] == 0.5 and run["pixel_spacing_used"] == [0.5, 0.5]
    masks = np.stack([np.load(out / f"sample_0{i}.npy") for i in range(2)])
    truth = np.asarray(arr[0] if arr.ndim == 3 else arr) > 0.5
    assert masks.shape[1:] == truth.shape
    assert all(_iou(m > 0, truth) > 0.9 for m in masks)
    # --spacing overrides the header; an unknown spacing is said once
    npy = tmp_path / "scene.npy"
    np.save(npy, image)
    assert main(["sample", "--model", str(path), "--image", str(npy), "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "u"), "--device", "cpu", "--quiet",
                 "--allow-large"]) == 0
    err = capsys.readouterr().err
    assert err.count("pixel spacing is unknown") == 1
    assert main(["sample", "--model", str(path), "--image", str(npy), "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "s"), "--device", "cpu", "--quiet",
                 "--spacing", "0.5"]) == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["resampled_zoom"] == 0.5
    assert main(["sample", "--model", str(path), "--image", str(npy), "--spacing", "-1",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "--spacing takes one or two positive numbers" in capsys.readouterr().err


def test_cli_refine_resamples_image_and_prior_to_the_refiners_spacing(tmp_path, capsys):
    from napari_berdiff.cli import main
    from napari_berdiff.data.phantoms import make_phantom

    models = __import__("pathlib").Path(__file__).resolve().parents[2] / "models"
    ph = make_phantom(70_123, 128)  # a 64 mm phantom at 0.5 mm; the refiner works at 1 mm
    np.save(tmp_path / "img.npy", ph.image)
    prior = ph.masks.max(axis=0).astype(np.uint8)
    np.save(tmp_path / "prior.npy", prior)
    out = tmp_path / "o"
    assert main(["refine", "--model", str(models / "refiner-phantom-64.safetensors"),
                 "--image", str(tmp_path / "img.npy"), "--prior", str(tmp_path / "prior.npy"),
                 "--spacing", "0.5", "--n", "2", "--steps", "3", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["resampled_zoom"] == 0.5
    masks = np.stack([np.load(out / f"sample_0{i}.npy") for i in range(2)])
    assert masks.shape == (2, 128, 128)
    assert all(_iou(m > 0, prior > 0) > 0.5 for m in masks)


def test_evaluate_resamples_by_the_data_sets_spacing():
    from napari_berdiff.data.dataset import SegDataset, SegItem
    from napari_berdiff.training.evaluate import evaluate

    image = _scene(128)
    item = SegItem(image, (image > 0.5)[None].astype(np.uint8), "c0", "0")
    ds = SegDataset([item], {"layout": "lidc", "spacing": [0.5, 0.5]})
    model = _model()
    shapes = []
    plain = model.sample_all

    def spy(image, *a, **k):
        shapes.append(np.asarray(image).shape[-2:])
        return plain(image, *a, **k)

    model.sample_all = spy
    rep = evaluate(model, ds, n=2, steps=4, annotators=False)
    assert rep.settings["spacing"] == [0.5, 0.5]
    assert shapes == [(64, 64)]  # sampled at the model's 1 mm
    # resampled to the model's 1 mm and back: the samples still match the reference
    assert rep.summary()["model"]["hm_iou"] > 0.9
