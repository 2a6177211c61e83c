"""The NIfTI reader and writers round-trip images and label maps, directly and via napari."""

from __future__ import annotations

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from napari_berdiff._nifti_io import get_reader, read_nifti, write_image, write_labels  # noqa: E402


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return (rng.normal(0, 300, (5, 12, 9))).astype(np.float32)


@pytest.fixture
def labels():
    lab = np.zeros((5, 12, 9), np.uint8)
    lab[1:4, 3:8, 2:6] = 1
    lab[2, 0:2, 0:2] = 3
    return lab


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_image_round_trip(tmp_path, volume, ext):
    path = str(tmp_path / f"ct{ext}")
    written = write_image(path, volume, {"scale": (2.5, 0.8, 0.7), "translate": (0, 0, 0),
                                         "metadata": {}})
    assert written == [path]
    assert get_reader(path) is read_nifti
    [(data, kwargs, kind)] = read_nifti(path)
    assert kind == "image"
    np.testing.assert_array_equal(data, volume)
    assert data.dtype == np.float32
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.8, 0.7), rtol=1e-6)
    assert kwargs["name"] == "ct"
    # the file itself is (i, j, k) = reversed napari axes, with the voxel sizes in its header
    img = nib.load(path)
    assert img.shape == (9, 12, 5)
    np.testing.assert_allclose(img.header.get_zooms(), (0.7, 0.8, 2.5), rtol=1e-6)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_labels_round_trip(tmp_path, labels, ext):
    path = str(tmp_path / f"lesion{ext}")
    write_labels(path, labels, {"scale": (1.0, 1.0, 1.0), "metadata": {}})
    [(data, kwargs, kind)] = read_nifti(path)
    assert kind == "labels"
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, labels)
    assert int(nib.load(path).header["intent_code"]) == 1002  # NIFTI_INTENT_LABEL


def test_read_write_read_keeps_the_affine(tmp_path, volume):
    affine = np.array([[-0.7, 0, 0, 90.0], [0, -0.8, 0, 120.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    src = tmp_path / "scanner.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), affine), str(src))
    [(data, kwargs, kind)] = read_nifti(str(src))
    assert kind == "image"
    out = str(tmp_path / "copy.nii.gz")
    write_image(out, data, kwargs)
    again = nib.load(out)
    np.testing.assert_allclose(again.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.transpose(volume, (2, 1, 0)))


def test_label_detection(tmp_path):
    ct = (np.arange(4 * 6 * 7).reshape(4, 6, 7) * 13 - 1000).astype(np.int16)
    write_image(str(tmp_path / "scan.nii.gz"), ct, {"metadata": {}})
    assert read_nifti(str(tmp_path / "scan.nii.gz"))[0][2] == "image"
    seg = np.zeros((4, 6, 7), np.int16)
    seg[1, 2, 3] = 2
    write_image(str(tmp_path / "case_seg.nii.gz"), seg, {"metadata": {}})
    assert read_nifti(str(tmp_path / "case_seg.nii.gz"))[0][2] == "labels"
    assert get_reader(str(tmp_path / "notes.txt")) is None


def test_napari_opens_and_saves_nifti(make_napari_viewer, tmp_path, volume, labels):
    viewer = make_napari_viewer()
    img_path = tmp_path / "ct.nii.gz"
    lab_path = tmp_path / "ct_mask.nii.gz"
    write_image(str(img_path), volume, {"scale": (3.0, 1.0, 1.0), "metadata": {}})
    write_labels(str(lab_path), labels, {"metadata": {}})
    [img_layer] = viewer.open(str(img_path), plugin="napari-berdiff")
    [lab_layer] = viewer.open(str(lab_path), plugin="napari-berdiff")
    assert img_layer._type_string == "image" and lab_layer._type_string == "labels"
    np.testing.assert_allclose(img_layer.scale, (3.0, 1.0, 1.0))
    # napari's own save goes through our writers
    out_img = tmp_path / "saved.nii.gz"
    out_lab = tmp_path / "saved_mask.nii.gz"
    img_layer.save(str(out_img), plugin="napari-berdiff")
    lab_layer.save(str(out_lab), plugin="napari-berdiff")
    [(d1, k1, t1)] = read_nifti(str(out_img))
    [(d2, _, t2)] = read_nifti(str(out_lab))
    assert (t1, t2) == ("image", "labels")
    np.testing.assert_array_equal(d1, volume)
    np.testing.assert_array_equal(d2, labels)
    np.testing.assert_allclose(k1["scale"], (3.0, 1.0, 1.0))
