"""DICOM SEG writers, provenance records, geometry inheritance and the model's window."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from napari_berdiff.dicom_io import read_dicom_volume  # noqa: E402
from napari_berdiff.dicom_seg import (  # noqa: E402
    SegWriteError,
    read_provenance,
    write_fractional_seg,
    write_labels_seg,
)
from napari_berdiff.geometry import derived_metadata, dicom_nifti_affine  # noqa: E402
from napari_berdiff.provenance import (  # noqa: E402
    PROVENANCE_KEY,
    accept_record,
    edited_after_accept,
    file_sha256,
    with_accept,
)

from .dicom_helpers import hu_volume, write_ct_series  # noqa: E402


@pytest.fixture
def series(tmp_path):
    write_ct_series(tmp_path / "ct", hu_volume(nz=4, ny=20, nx=18), spacing=(2.0, 0.8, 0.6))
    return read_dicom_volume(tmp_path / "ct")


def _record(tmp_path, **choice):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights")
    model = {"file": str(ckpt), "sha256": file_sha256(ckpt), "kind": "bernoulli",
             "name": "berdiff-test"}
    return accept_record(model=model, seed=7, steps=10, step_spec="ddimuni10",
                         temperature=0.25, choice=choice or {"sample": 3},
                         region={"mode": "slice", "roi": [2, 3, 12, 15], "slice": 1},
                         spacing=(2.0, 0.8, 0.6), label=1, n_samples=8)


def _accepted(series, tmp_path, data):
    geometry = {"dicom": series.metadata()}
    meta = derived_metadata(geometry, (0, 0, 0), data.shape)
    meta = with_accept(meta, _record(tmp_path), data)
    return {"name": "accepted", "metadata": meta}


def test_labels_seg_round_trip_references_the_series_and_keeps_provenance(series, tmp_path):
    labels = np.zeros(series.array.shape, np.uint8)
    labels[1, 4:9, 5:11] = 1
    labels[2, 6:8, 6:9] = 1
    attrs = _accepted(series, tmp_path, labels)
    [path] = write_labels_seg(str(tmp_path / "out"), labels, attrs)
    assert path.endswith(".dcm")
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=series.sop_instance_uids, combine_segments=True,
        skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, labels)
    item = seg.SegmentSequence[0]
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert item.SegmentLabel.startswith("berdiff-test")
    alg = item.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "berdiff-test" and alg.AlgorithmFamilyCodeSequence[0].CodeValue
    doc = read_provenance(path)
    rec = doc["accepts"][0]
    assert rec == attrs["metadata"][PROVENANCE_KEY]["accepts"][0]
    assert rec["model"]["sha256"] == file_sha256(tmp_path / "model.safetensors")
    assert rec["seed"] == 7 and rec["temperature"] == 0.25 and rec["choice"] == {"sample": 3}
    assert doc["edited_after_accept"] is False
    assert "sample 3" in seg.ContentDescription and "berdiff-test" in seg.SeriesDescription


def test_an_edited_mask_is_semiautomatic_and_several_labels_are_segments(series, tmp_path):
    labels = np.zeros(series.array.shape, np.uint8)
    labels[0, 2:5, 2:5] = 1
    attrs = _accepted(series, tmp_path, labels)
    assert edited_after_accept(attrs["metadata"], labels) is False
    labels[3, 10:12, 10:12] = 4  # painted after the accept
    assert edited_after_accept(attrs["metadata"], labels) is True
    [path] = write_labels_seg(str(tmp_path / "edited.dcm"), labels, attrs)
    seg = hd.seg.segread(path)
    assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["SEMIAUTOMATIC"] * 2
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["berdiff-test label 1",
                                                            "berdiff-test label 4"]
    assert read_provenance(path)["edited_after_accept"] is True


def test_a_region_map_is_a_fractional_seg_on_its_frames(series, tmp_path):
    rng = np.random.default_rng(0)
    freq = (rng.integers(0, 9, (1, 10, 12)) / 8.0).astype(np.float32)  # slice 2, a region
    meta = derived_metadata({"dicom": series.metadata()}, (2, 5, 4), freq.shape)
    [path] = write_fractional_seg(str(tmp_path / "freq.dcm"), freq,
                                  {"name": "frequency", "metadata": meta})
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    full = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[series.sop_instance_uids[2]], combine_segments=False)[0, ..., 0]
    np.testing.assert_allclose(full[5:15, 4:16], freq[0], atol=0.5 / 255 + 1e-6)
    outside = full.copy()
    outside[5:15, 4:16] = 0
    assert not outside.any()


def test_seg_errors_are_named(series, tmp_path):
    labels = np.zeros(series.array.shape, np.uint8)
    with pytest.raises(SegWriteError, match="not over a DICOM series.*NIfTI"):
        write_labels_seg(str(tmp_path / "a.dcm"), labels, {"name": "x", "metadata": {}})
    with pytest.raises(SegWriteError, match="empty"):
        write_labels_seg(str(tmp_path / "a.dcm"), labels, _accepted(series, tmp_path, labels))
    samples = np.ones((3, *series.array.shape), np.uint8)
    meta = derived_metadata({"dicom": series.metadata()}, (0, 0, 0), samples.shape)
    with pytest.raises(SegWriteError, match="several samples"):
        write_labels_seg(str(tmp_path / "a.dcm"), samples, {"name": "samples", "metadata": meta})
    with pytest.raises(SegWriteError, match=r"outside \[0, 1\]"):
        write_fractional_seg(str(tmp_path / "a.dcm"), series.array,
                             {"metadata": {"dicom": series.metadata()}})
    labels[0, 0, 0] = 1
    attrs = _accepted(series, tmp_path, labels)
    from pathlib import Path

    Path(series.files[1]).unlink()
    with pytest.raises(SegWriteError, match="file .* is gone"):
        write_labels_seg(str(tmp_path / "a.dcm"), labels, attrs)
    assert not (tmp_path / "a.dcm").exists()


def test_derived_nifti_affine_moves_with_the_region():
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = (100, 120, -30)
    src = {"nifti": {"affine": affine.tolist(), "shape": [40, 30, 5], "zooms": [0.8, 0.8, 2.5]}}
    # a (N, 1, h, w) samples layer over slice 3, rows 4.., columns 6..
    meta = derived_metadata(src, (3, 4, 6), (8, 1, 10, 12))["nifti"]
    assert meta["shape"] == [12, 10, 1, 8]
    moved = np.asarray(meta["affine"])
    np.testing.assert_allclose(moved @ [0, 0, 0, 1], affine @ [6, 4, 3, 1])
    np.testing.assert_allclose(moved[:3, :3], affine[:3, :3])


def test_dicom_geometry_gives_a_ras_nifti_affine(series):
    meta = series.metadata()
    aff = dicom_nifti_affine(meta, tuple(reversed(series.array.shape)))
    # file voxel (i=c, j=r, k=slice) -> RAS = LPS with x, y negated
    for k, r, c in [(0, 0, 0), (3, 5, 7)]:
        lps = series.affine @ [k, r, c, 1]
        np.testing.assert_allclose(aff @ [c, r, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-9)
    assert dicom_nifti_affine(meta, (3, 3, 3)) is None  # a shape that is not the series'


def test_model_window_applies_to_hu_images_only():
    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.windowing import LUNG_WINDOW, model_window

    from .toys import TinyConvNet

    cfg = DiffusionConfig(kind="bernoulli", timesteps=10, default_steps=2, prediction="x0")
    model = DiffusionModel(TinyConvNet(), cfg, {"name": "m", "network": {"type": "toy"}, "data": {
        "normalisation": {"mode": "minmax"},
        "window": {"units": "HU", "width": 400, "level": 40}}})
    hu = np.array([[-1000.0, -160.0], [40.0, 3000.0]], np.float32)
    np.testing.assert_allclose(model.prepare(hu, units="HU")[0], [[0, 0], [0.5, 1]])
    # not in HU: the model's normalisation (min-max)
    np.testing.assert_allclose(model.prepare(hu)[0], (hu - hu.min()) / (hu.max() - hu.min()))
    assert model_window({"name": "berdiff-lidc-128", "data": {}}) == LUNG_WINDOW
    assert model_window({"name": "phantom", "data": {}}) is None


def test_cli_samples_a_series_folder_in_the_models_window(tmp_path, capsys):
    import json

    from napari_berdiff.checkpoints import load_model, save_model
    from napari_berdiff.cli import main
    from napari_berdiff.windowing import apply_window

    from .ckpt_helpers import tiny_model

    window = {"units": "HU", "width": 1500.0, "level": -600.0}
    model = tiny_model(data={"description": "test", "window": window})
    path = save_model(model, tmp_path / "tiny.safetensors")
    hu = hu_volume(nz=3, ny=16, nx=16)
    write_ct_series(tmp_path / "ct", hu, spacing=(1.25, 0.5, 0.5))
    code = main(["sample", "--model", str(path), "--image", str(tmp_path / "ct"), "--slice",
                 "1", "--n", "2", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["pixel_spacing"] == [1.25, 0.5, 0.5] and run["slice"] == 1
    loaded = load_model(path)
    assert loaded.window == window
    ref = loaded.sample_all(apply_window(hu[1], window), n=2, steps=2, seed=3, normalise=False)
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / "o" / f"sample_{i:02d}.npy"),
                                      ref.masks[i] > 0)


@pytest.mark.filterwarnings("error::UserWarning")
def test_a_single_slice_file_gets_a_seg_and_a_ras_nifti(tmp_path):
    import shutil

    import nibabel as nib

    from napari_berdiff._nifti_io import write_labels
    from napari_berdiff.dicom_io import read_dicom_layers

    from .dicom_helpers import pydicom_file

    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "ct.dcm")
    [(data, kw, _)] = read_dicom_layers(str(tmp_path / "ct.dcm"))
    labels = np.zeros(data.shape, np.uint8)
    labels[40:60, 70:90] = 2
    meta = derived_metadata(kw["metadata"], (0, 0), labels.shape)
    meta = with_accept(meta, _record(tmp_path, consensus="majority", threshold=0.5), labels)
    [path] = write_labels_seg(str(tmp_path / "seg.dcm"), labels, {"metadata": meta})
    seg = hd.seg.segread(path)
    sop = kw["metadata"]["dicom"]["sop_instance_uids"]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop,
                                               combine_segments=True)
    np.testing.assert_array_equal(pixels[0] > 0, labels > 0)
    assert read_provenance(path)["accepts"][0]["choice"] == {"consensus": "majority",
                                                             "threshold": 0.5}
    written = write_labels(str(tmp_path / "mask.nii.gz"), labels, {"metadata": meta,
                                                                   "scale": kw["scale"]})
    assert written[1].endswith("mask.provenance.json")
    img = nib.load(written[0])
    ipp = kw["metadata"]["dicom"]["origin"]  # the slice's ImagePositionPatient (LPS)
    np.testing.assert_allclose(img.affine @ [0, 0, 0, 1], [-ipp[0], -ipp[1], ipp[2], 1])


def test_seg_over_an_enhanced_multiframe_series_lands_on_the_same_voxels(tmp_path):
    from pydicom.uid import generate_uid

    from .dicom_helpers import read

    paths = write_ct_series(tmp_path / "ct", hu_volume(nz=4), spacing=(3.0, 0.6, 0.6))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [read(p) for p in paths], series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    vol = read_dicom_volume(tmp_path / "enhanced.dcm")
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[1, 3:8, 4:9] = 1
    labels[3, 10:12, 2:5] = 1
    meta = derived_metadata({"dicom": vol.metadata()}, (0, 0, 0), labels.shape)
    [path] = write_labels_seg(str(tmp_path / "seg.dcm"), labels, {"metadata": meta})
    seg = hd.seg.segread(path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.series_uid
    back = seg.get_volume(combine_segments=True)
    world = back.affine @ np.c_[np.argwhere(back.array > 0), np.ones(int(back.array.sum()))].T
    ours = np.round(np.linalg.inv(vol.affine) @ world).astype(int)[:3].T
    assert sorted(map(tuple, ours)) == sorted(map(tuple, np.argwhere(labels > 0)))
