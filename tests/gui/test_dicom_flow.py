"""Layer flows over DICOM series and NIfTI volumes: geometry, windowing, SEG and provenance.

open → sample → accept → save → reopen must land every voxel where it was in the world.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from napari_berdiff._qt._layers import SAMPLES

from ..engine.dicom_helpers import write_ct_series
from .conftest import run_and_wait, toy_model

nib = pytest.importorskip("nibabel")
hd = pytest.importorskip("highdicom")

PLUGIN = "napari-berdiff"


def _layer(viewer, name):
    return next(lay for lay in viewer.layers if lay.name == name)


def _settings(widget, n=3, seed=0, steps=2):
    sp = widget.sampling
    sp.n_spin.setValue(n)
    sp.seed_spin.setValue(seed)
    sp.steps_spin.setValue(steps)


def _ct_volume(nz=3, ny=24, nx=24):
    """HU values (even integers) with a bright 'nodule' in each slice."""
    yy, xx = np.mgrid[:ny, :nx]
    vol = np.full((nz, ny, nx), -800, np.int32)
    for k in range(nz):
        vol[k][((yy - 12) ** 2 + (xx - 11 - k) ** 2) < 30] = 40
    rng = np.random.default_rng(0)
    return vol + 2 * rng.integers(-20, 20, vol.shape)


def _world_foreground(affine, file_data):
    ijk = np.argwhere(np.asarray(file_data) > 0)
    return np.round((affine[:3, :3] @ ijk.T).T + affine[:3, 3], 4)


def test_nifti_geometry_survives_open_sample_accept_save_reopen(docked, qtbot, tmp_path):
    viewer, widget = docked
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = (100.0, 120.0, -30.0)
    vol = np.stack([np.clip(b, 0, 1) for b in _ct_volume() / 1000.0 + 0.8]).astype(np.float32)
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)), affine), str(src))
    [image] = viewer.open(str(src), plugin=PLUGIN)
    widget.set_model(toy_model(steps=2, size=24), "toy")
    _settings(widget, n=3)
    widget.sampling.set_volume_mode("slice")
    viewer.dims.set_point(0, 1 * 2.5)  # slice 1 (world units: scale 2.5)
    run_and_wait(qtbot, widget)
    target = widget.accept(index=0)
    assert target.data[1].any() and not target.data[0].any()
    out = tmp_path / "accepted.nii.gz"
    target.save(str(out), plugin=PLUGIN)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    # voxel for voxel in world coordinates: the mask's foreground lands where it was drawn
    drawn = _world_foreground(affine, np.transpose(target.data, (2, 1, 0)))
    np.testing.assert_array_equal(_world_foreground(back.affine, back.dataobj), drawn)
    assert drawn[0] is not None and np.all(drawn[:, 2] == -30.0 + 2.5)  # slice 1's z
    # the provenance sidecar sits next to it
    side = json.loads((tmp_path / "accepted.provenance.json").read_text())
    assert side["accepts"][0]["choice"] == {"sample": 0}
    assert side["accepts"][0]["region"]["slice"] == 1 and not side["edited_after_accept"]
    # the result layers inherit it too: the frequency map (one slice) and the samples
    freq = _layer(viewer, "frequency")
    freq.save(str(tmp_path / "freq.nii.gz"), plugin=PLUGIN)
    f = nib.load(str(tmp_path / "freq.nii.gz"))
    np.testing.assert_allclose(f.affine[:3, 3], affine[:3, :3] @ [0, 0, 1] + affine[:3, 3])
    samples = _layer(viewer, SAMPLES)
    assert samples.metadata["nifti"]["shape"] == [24, 24, 1, 3]


def test_dicom_series_sample_accept_seg_round_trip(docked, qtbot, tmp_path):
    viewer, widget = docked
    hu = _ct_volume()
    write_ct_series(tmp_path / "ct", hu, spacing=(2.0, 0.7, 0.7), description="Chest CT")
    layers = viewer.open(str(tmp_path / "ct"), plugin=PLUGIN)
    assert [lay.name for lay in layers] == ["Chest CT"]
    image = layers[0]
    np.testing.assert_array_equal(image.data, hu)
    np.testing.assert_allclose(image.scale, (2.0, 0.7, 0.7))
    meta = image.metadata["dicom"]
    model = toy_model(steps=2, size=24)
    model.metadata["data"]["window"] = {"units": "HU", "width": 1500, "level": -600}
    (tmp_path / "toy.safetensors").write_bytes(b"toy weights")
    model.source_path = str(tmp_path / "toy.safetensors")
    widget.set_model(model, "toy")
    _settings(widget, n=3, seed=4)
    widget.sampling.set_volume_mode("slice")
    viewer.dims.set_point(0, 2 * 2.0)  # slice 2
    # the model's window applies whatever the display shows
    image.contrast_limits = (-50, 60)
    run_and_wait(qtbot, widget)
    first = _layer(viewer, SAMPLES).data.copy()
    image.contrast_limits = (-1000, 2000)
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(_layer(viewer, SAMPLES).data, first)
    windowed = np.clip((hu[2] + 1350.0) / 1500.0, 0, 1).astype(np.float32)
    ref = model.sample_all(windowed, n=3, steps=2, seed=4 + 2, normalise=False)
    np.testing.assert_array_equal(first[:, 0], ref.masks)

    target = widget.accept(index=1)
    assert target.metadata["dicom"]["series_uid"] == meta["series_uid"]
    seg_path = tmp_path / "accepted_seg.dcm"
    target.save(str(seg_path), plugin=PLUGIN)
    seg = hd.seg.segread(str(seg_path))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == meta["series_uid"]
    assert seg.StudyInstanceUID == meta["study_uid"]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=meta["sop_instance_uids"], combine_segments=True,
        skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, target.data)
    item = seg.SegmentSequence[0]
    assert item.SegmentAlgorithmType == "AUTOMATIC" and "toy" in item.SegmentLabel
    from napari_berdiff.dicom_seg import read_provenance

    doc = read_provenance(str(seg_path))
    record = doc["accepts"][0]
    assert record == target.metadata["napari_berdiff_provenance"]["accepts"][0]
    assert record["seed"] == 4 and record["steps"] == 2 and record["choice"] == {"sample": 1}
    assert record["model"]["kind"] == "bernoulli" and record["spacing"] == [2.0, 0.7, 0.7]
    assert record["model"]["sha256"] == hashlib.sha256(b"toy weights").hexdigest()
    assert record["model"]["file"].endswith("toy.safetensors")

    # an edit after accepting makes it semi-automatic
    target.data_setitem((np.array([0]), np.array([0]), np.array([0])), 1)
    target.save(str(tmp_path / "edited_seg.dcm"), plugin=PLUGIN)
    edited = hd.seg.segread(str(tmp_path / "edited_seg.dcm"))
    assert edited.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert read_provenance(edited)["edited_after_accept"] is True

    # the frequency map as a fractional SEG, on its slice only
    freq = _layer(viewer, "frequency")
    freq.save(str(tmp_path / "freq_seg.dcm"), plugin=PLUGIN)
    fseg = hd.seg.segread(str(tmp_path / "freq_seg.dcm"))
    assert fseg.SegmentationType == "FRACTIONAL"
    fp = fseg.get_pixels_by_source_instance(
        source_sop_instance_uids=[meta["sop_instance_uids"][2]], combine_segments=False)
    np.testing.assert_allclose(fp[0, ..., 0], freq.data[0], atol=1 / 255 / 2 + 1e-6)


def test_window_presets_change_the_display_only(docked, tmp_path):
    viewer, widget = docked
    write_ct_series(tmp_path / "ct", _ct_volume(), description="CT")
    [image] = viewer.open(str(tmp_path / "ct"), plugin=PLUGIN)
    before = image.data.copy()
    box = widget.sampling.window_box
    box.setCurrentText("lung")
    assert tuple(image.contrast_limits) == pytest.approx((-1350.0, 150.0))
    box.setCurrentText("brain")
    assert tuple(image.contrast_limits) == pytest.approx((0.0, 80.0))
    np.testing.assert_array_equal(image.data, before)


def test_result_and_accepted_layers_inherit_the_image_layers_affine(docked, qtbot):
    from .conftest import blob

    viewer, widget = docked
    rot = np.array([[0.0, -1.0, 5.0], [1.0, 0.0, -3.0], [0.0, 0.0, 1.0]])  # 90° and a shift
    image = viewer.add_image(blob(), name="img", scale=(0.5, 0.7), affine=rot)
    widget.set_model(toy_model(steps=2), "toy")
    _settings(widget, n=2)
    run_and_wait(qtbot, widget)
    target = widget.accept(index=0)
    for layer in (_layer(viewer, SAMPLES), _layer(viewer, "frequency"), target):
        lead = (0,) * (layer.ndim - 2)
        for yx in [(0, 0), (7, 11)]:
            np.testing.assert_allclose(layer.data_to_world((*lead, *yx))[-2:],
                                       image.data_to_world(yx), atol=1e-9)
    # each accept appends its record; a consensus records its rule and threshold
    widget.results.consensus_combo.setCurrentIndex(1)
    widget.results.tau_spin.setValue(0.5)
    again = widget.accept_consensus()
    assert again.name == "accepted" and len(viewer.layers) == len(set(viewer.layers))
    accepts = again.metadata["napari_berdiff_provenance"]["accepts"]
    assert [a["choice"] for a in accepts] == [
        {"sample": 0}, {"consensus": "frequency", "threshold": 0.5, "rule": ">="}]
    assert accepts[1]["region"] == {"mode": "2d", "roi": [0, 0, 32, 32]}
    assert accepts[1]["spacing"] == [0.5, 0.7] and accepts[1]["n_samples"] == 2
