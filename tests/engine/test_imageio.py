"""Image readers and the mask/map writers used by the command line."""

from __future__ import annotations

import numpy as np
import pytest

from napari_berdiff.imageio import read_image, to_grey, write_map, write_mask


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_png_grey_8_and_16_bit(tmp_path, rng):
    from PIL import Image

    a8 = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(a8).save(tmp_path / "a.png")
    arr, info = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(arr, a8)
    assert info["axes"] == "YX" and info["converted_to_grey"] is False
    assert info["shape"] == (20, 24) and info["spacing"] is None

    a16 = rng.integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "b.png")
    arr, _ = read_image(tmp_path / "b.png")
    np.testing.assert_array_equal(arr, a16)


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_becomes_grey_with_the_flag(tmp_path, rng, channels):
    from PIL import Image

    rgb = rng.integers(0, 256, (16, 18, channels), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr, info = read_image(tmp_path / "c.png")
    assert info["converted_to_grey"] is True and arr.shape == (16, 18)
    expected = rgb[..., :3].astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(arr, expected, rtol=1e-5)
    np.testing.assert_allclose(to_grey(rgb), expected, rtol=1e-5)

    np.save(tmp_path / "c.npy", rgb)
    arr, info = read_image(tmp_path / "c.npy")
    assert info["converted_to_grey"] is True and arr.shape == (16, 18)


def test_tiff_2d_volume_and_rgb(tmp_path, rng):
    import tifffile

    img = rng.random((12, 14), dtype=np.float32)
    tifffile.imwrite(tmp_path / "a.tif", img)
    arr, info = read_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(arr, img)
    assert info["axes"] == "YX" and info["format"] == "tiff"

    vol = rng.integers(0, 4000, (5, 12, 14), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "v.tiff", vol)
    arr, info = read_image(tmp_path / "v.tiff")
    np.testing.assert_array_equal(arr, vol)
    assert info["axes"] == "ZYX" and info["converted_to_grey"] is False

    rgb = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    arr, info = read_image(tmp_path / "rgb.tif")
    assert info["converted_to_grey"] is True and arr.shape == (12, 14)


def test_npy(tmp_path, rng):
    vol = rng.standard_normal((3, 8, 9)).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    arr, info = read_image(tmp_path / "v.npy")
    np.testing.assert_array_equal(arr, vol)
    assert info["axes"] == "ZYX" and info["dtype"] == "float32"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_axis_order_spacing_and_scaling(tmp_path, rng, suffix):
    import nibabel as nib

    data = rng.integers(-100, 100, (6, 5, 4), dtype=np.int16)  # voxel axes (i, j, k)
    img = nib.Nifti1Image(data, affine=np.diag([0.7, 0.8, 2.5, 1.0]))
    img.header.set_zooms((0.7, 0.8, 2.5))
    img.header.set_slope_inter(2.0, -10.0)
    path = tmp_path / f"vol{suffix}"
    nib.save(img, str(path))

    arr, info = read_image(path)
    assert arr.shape == (4, 5, 6) and info["axes"] == "ZYX"
    np.testing.assert_allclose(arr, data.transpose(2, 1, 0) * 2.0 - 10.0)
    assert arr[3, 2, 1] == data[1, 2, 3] * 2 - 10  # arr[k, j, i] == data[i, j, k]
    assert info["spacing"] == pytest.approx((2.5, 0.8, 0.7))

    # A 2D slice stored as X × Y × 1 comes back as (Y, X).
    flat = nib.Nifti1Image(data[:, :, :1].astype(np.float32), affine=np.eye(4))
    nib.save(flat, str(tmp_path / f"flat{suffix}"))
    arr, info = read_image(tmp_path / f"flat{suffix}")
    assert arr.shape == (5, 6) and info["axes"] == "YX"
    np.testing.assert_array_equal(arr, data[:, :, 0].T)


def _write_dicom(path, pixels, slope=2.0, intercept=-1024.0, spacing=(0.6, 0.7)):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelSpacing = list(spacing)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_rescale_and_spacing(tmp_path, rng):
    raw = rng.integers(0, 2000, (10, 11), dtype=np.int16)
    _write_dicom(tmp_path / "ct.dcm", raw)
    arr, info = read_image(tmp_path / "ct.dcm")
    np.testing.assert_allclose(arr, raw * 2.0 - 1024.0)
    assert info["spacing"] == pytest.approx((0.6, 0.7))
    assert info["axes"] == "YX" and info["modality"] == "CT"


def test_unknown_extension_and_missing_file(tmp_path):
    bad = tmp_path / "scan.xyz"
    bad.write_bytes(b"data")
    with pytest.raises(ValueError, match=r"unsupported file type '\.xyz'.*\.png.*\.nii\.gz.*\.dcm"):
        read_image(bad)
    with pytest.raises(ValueError, match="no such image file"):
        read_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read broken.png"):
        read_image(broken)


def test_write_mask_and_map(tmp_path):
    from PIL import Image
    import tifffile

    mask = np.zeros((6, 7), np.uint8)
    mask[2:4, 1:5] = 1
    files = write_mask(tmp_path / "sample_00", mask)
    assert sorted(f.name for f in files) == ["sample_00.npy", "sample_00.png", "sample_00.tif"]
    np.testing.assert_array_equal(np.load(tmp_path / "sample_00.npy"), mask)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "sample_00.tif"), mask)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "sample_00.png")), mask * 255)

    var = np.full((6, 7), 0.125, np.float32)
    var[0, 0], var[0, 1] = 0.0, 0.25
    write_map(tmp_path / "variance", var, "variance")
    np.testing.assert_array_equal(np.load(tmp_path / "variance.npy"), var)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "variance.tif"), var)
    png = np.array(Image.open(tmp_path / "variance.png"))
    assert png[0, 0] == 0 and png[0, 1] == 255 and png[3, 3] == 128  # fixed limits (0, 0.25)
