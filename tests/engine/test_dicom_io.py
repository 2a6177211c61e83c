"""The DICOM series reader: slice order, HU, spacing, orientation, named errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("pydicom")

from napari_berdiff import dicom_io  # noqa: E402
from napari_berdiff.dicom_io import (  # noqa: E402
    IrregularSpacingError,
    MixedSeriesError,
    NotAnImageError,
    TruncatedFileError,
    UnsupportedCompressionError,
    read_dicom_layers,
    read_dicom_volume,
    read_dicom_volumes,
)
from napari_berdiff.imageio import read_image  # noqa: E402

from .dicom_helpers import hu_volume, read, pydicom_file, write_ct_series  # noqa: E402

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows along +y, columns along -z: normal -x


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), SAGITTAL])
def test_shuffled_series_opens_in_order_with_hu_spacing_orientation(tmp_path, orientation):
    hu = hu_volume(nz=6)
    paths = write_ct_series(tmp_path / "ct", hu, spacing=(2.5, 0.7, 0.9),
                            orientation=orientation, origin=(-100.0, -120.0, 30.0))
    # the files' names, write order and InstanceNumbers all disagree with the true order
    assert [read(p).InstanceNumber for p in sorted(paths)] != list(range(1, 7))
    vol = read_dicom_volume(tmp_path / "ct")
    np.testing.assert_array_equal(vol.array, hu)  # order and HU (slope 2, intercept -1024)
    assert vol.array.dtype == np.float32 and vol.units == "HU"
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.9))
    assert vol.orientation == pytest.approx(orientation)
    # the affine maps each slice's index to the position written in its file
    for k, f in enumerate(vol.files):
        ds = read(f)
        assert ds.SOPInstanceUID == vol.sop_instance_uids[k]
        np.testing.assert_allclose(vol.affine @ [k, 0, 0, 1], [*ds.ImagePositionPatient, 1],
                                   atol=1e-6)
    # pixel (r, c) of a slice lies at IPP + c·Δc·row_cosines + r·Δr·column_cosines
    np.testing.assert_allclose(vol.affine[:3, 1], np.asarray(orientation[3:]) * 0.7)
    np.testing.assert_allclose(vol.affine[:3, 2], np.asarray(orientation[:3]) * 0.9)
    ds0 = read(paths[0])
    assert vol.series_uid == ds0.SeriesInstanceUID and vol.study_uid == ds0.StudyInstanceUID


def test_reader_gives_one_layer_per_series_named_by_description(tmp_path):
    write_ct_series(tmp_path / "study" / "a", hu_volume(nz=4, seed=1),
                    description="Chest 1.25mm", series_number=2)
    write_ct_series(tmp_path / "study" / "b", hu_volume(nz=3, seed=2), spacing=(5.0, 0.8, 0.8),
                    description="Chest 5mm", series_number=5)
    reader = dicom_io.get_reader(str(tmp_path / "study"))
    assert reader is read_dicom_layers
    layers = reader(str(tmp_path / "study"))
    assert [(kw["name"], d.shape, t) for d, kw, t in layers] == [
        ("Chest 1.25mm", (4, 24, 20), "image"), ("Chest 5mm", (3, 24, 20), "image")]
    data, kw, _ = layers[1]
    assert kw["scale"] == pytest.approx((5.0, 0.8, 0.8))
    meta = kw["metadata"]["dicom"]
    assert meta["units"] == "HU" and meta["shape"] == [3, 24, 20]
    assert meta["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert meta["series_uid"] != layers[0][1]["metadata"]["dicom"]["series_uid"]
    assert meta["study_uid"] and len(meta["files"]) == 3


def test_reader_declines_what_is_not_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert dicom_io.get_reader(str(tmp_path)) is None
    assert dicom_io.get_reader(str(tmp_path / "notes.txt")) is None


def test_pydicom_real_test_files_open():
    ct = read_dicom_layers(pydicom_file("CT_small.dcm"))
    mr = read_dicom_layers(pydicom_file("MR_small.dcm"))
    (ct_data, ct_kw, _), (mr_data, mr_kw, _) = ct[0], mr[0]
    raw = read(pydicom_file("CT_small.dcm"))
    assert ct_data.shape == (128, 128) and ct_kw["scale"] == pytest.approx((0.661468, 0.661468))
    np.testing.assert_allclose(ct_data, raw.pixel_array * 1.0 - 1024.0)  # slope 1, −1024
    assert ct_kw["metadata"]["dicom"]["units"] == "HU"
    assert mr_data.shape == (64, 64) and mr_kw["metadata"]["dicom"]["modality"] == "MR"
    np.testing.assert_array_equal(mr_data, read(pydicom_file("MR_small.dcm")).pixel_array)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_syntaxes_decode_to_the_same_pixels(name):
    base = read_dicom_volume(pydicom_file("MR_small.dcm")).array
    vol = read_dicom_volume(pydicom_file(name))
    np.testing.assert_array_equal(vol.array, base)
    assert vol.transfer_syntaxes != ["1.2.840.10008.1.2.1"]


def test_undecodable_compression_is_named():
    with pytest.raises(UnsupportedCompressionError,
                       match=r"JPEG-lossy\.dcm.*JPEG Extended.*pylibjpeg"):
        read_dicom_volume(pydicom_file("JPEG-lossy.dcm"))


def test_enhanced_multiframe_matches_the_single_frame_series(tmp_path):
    hd = pytest.importorskip("highdicom")
    from pydicom.uid import generate_uid

    hu = hu_volume(nz=4, seed=3)
    paths = write_ct_series(tmp_path / "ct", hu, spacing=(3.0, 0.6, 0.6))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [read(p) for p in paths], series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    single = read_dicom_volume(tmp_path / "ct")
    multi = read_dicom_volume(tmp_path / "enhanced.dcm")
    assert multi.multiframe
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-5)
    assert multi.spacing == pytest.approx(single.spacing)


def test_non_image_dicom_is_refused_by_name(tmp_path):
    with pytest.raises(NotAnImageError, match=r"rtplan\.dcm is a RT Plan Storage.*no image"):
        read_dicom_layers(pydicom_file("rtplan.dcm"))
    with pytest.raises(NotAnImageError, match=r"Comprehensive SR"):
        read_dicom_layers(pydicom_file("test-SR.dcm"))


def test_truncated_file_fails_the_whole_folder(tmp_path):
    paths = write_ct_series(tmp_path / "ct", hu_volume(nz=4))
    blob = paths[2].read_bytes()
    paths[2].write_bytes(blob[: len(blob) - 300])  # pixel data cut short
    with pytest.raises(TruncatedFileError, match=paths[2].name):
        read_dicom_layers(str(tmp_path / "ct"))
    paths[2].write_bytes(blob[:200])  # header cut short
    with pytest.raises(TruncatedFileError, match=paths[2].name):
        read_dicom_layers(str(tmp_path / "ct"))
    with pytest.raises(TruncatedFileError, match="MR_truncated"):
        read_dicom_layers(pydicom_file("MR_truncated.dcm"))


def test_mixed_series_are_refused(tmp_path):
    from pydicom.uid import generate_uid

    uid = generate_uid()
    write_ct_series(tmp_path / "mixed", hu_volume(nz=3), series_uid=uid)
    write_ct_series(tmp_path / "mixed" / "other", hu_volume(nz=2, ny=16), series_uid=uid)
    with pytest.raises(MixedSeriesError, match="rows × columns"):
        read_dicom_volumes(tmp_path / "mixed")
    # two stacks of one series at the same positions (e.g. two echoes)
    write_ct_series(tmp_path / "dup", hu_volume(nz=3), series_uid=uid, names="plain")
    write_ct_series(tmp_path / "dup" / "echo2", hu_volume(nz=3, seed=5), series_uid=uid)
    with pytest.raises(MixedSeriesError, match="same position"):
        read_dicom_volumes(tmp_path / "dup")
    # a missing slice
    paths = write_ct_series(tmp_path / "gap", hu_volume(nz=5), shuffle=False, names="plain")
    paths[2].unlink()
    with pytest.raises(IrregularSpacingError, match="not evenly spaced"):
        read_dicom_volumes(tmp_path / "gap")
    # files of two series given where one is expected
    shutil.copytree(tmp_path / "mixed" / "other", tmp_path / "two" / "a")
    write_ct_series(tmp_path / "two" / "b", hu_volume(nz=2))
    with pytest.raises(MixedSeriesError, match="2 series"):
        read_dicom_volume(tmp_path / "two")


def test_read_image_reads_a_series_folder_for_the_cli(tmp_path):
    hu = hu_volume(nz=4)
    write_ct_series(tmp_path / "ct", hu, spacing=(1.5, 0.5, 0.5))
    arr, info = read_image(tmp_path / "ct")
    np.testing.assert_array_equal(arr, hu)
    assert info["axes"] == "ZYX" and info["units"] == "HU"
    assert info["spacing"] == pytest.approx((1.5, 0.5, 0.5))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM files"):
        read_image(tmp_path / "empty")


def test_reports_beside_a_series_are_skipped_but_alone_refused(tmp_path):
    write_ct_series(tmp_path / "study" / "ct", hu_volume(nz=3))
    shutil.copy(pydicom_file("test-SR.dcm"), tmp_path / "study" / "report.dcm")
    [vol] = read_dicom_volumes(tmp_path / "study")
    assert vol.array.shape == (3, 24, 20) and vol.skipped == ["report.dcm"]
    assert vol.metadata()["skipped_non_image"] == ["report.dcm"]
    (tmp_path / "reports").mkdir()
    shutil.copy(pydicom_file("rtplan.dcm"), tmp_path / "reports" / "plan.dcm")
    with pytest.raises(NotAnImageError, match="no image series.*plan.dcm is a RT Plan"):
        read_dicom_volumes(tmp_path / "reports")
