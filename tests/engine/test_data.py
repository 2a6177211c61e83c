"""Phantoms, the LIDC-crops layout, generic folders and splits (fast; no torch needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.io import imsave

from napari_berdiff.data.dataset import SegDataset, SegItem
from napari_berdiff.data.layout import (
    load_dataset,
    load_image_mask_folder,
    load_lidc_layout,
    write_lidc_layout,
)
from napari_berdiff.data.phantoms import Phantom, make_phantom, oracle_samples
from napari_berdiff.data.splits import split_cases, split_dataset


# ---------------------------------------------------------------------------- phantoms
def test_phantom_is_deterministic_and_seeds_differ():
    a, b = make_phantom(7, size=48), make_phantom(7, size=48)
    assert isinstance(a, Phantom)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.soft, b.soft)
    assert a.info == b.info
    c = make_phantom(8, size=48)
    assert not np.array_equal(a.image, c.image)


def test_phantom_contents():
    p = make_phantom(3, size=64, n_annotators=5)
    assert p.image.shape == (64, 64) and p.image.dtype == np.float32
    assert 0.0 <= p.image.min() and p.image.max() <= 1.0
    assert p.masks.shape == (5, 64, 64) and p.masks.dtype == np.uint8
    assert set(np.unique(p.masks)) <= {0, 1}
    assert p.soft.shape == (64, 64) and p.soft.dtype == np.float32
    assert 0.0 <= p.soft.min() and p.soft.max() <= 1.0
    for key in ("contrast", "faint", "thresholds", "missed"):
        assert key in p.info
    assert len(p.info["thresholds"]) == 5
    # At least one annotator marks the lesion; annotators differ (tighter / looser).
    areas = p.masks.reshape(5, -1).sum(1)
    assert areas.max() > 0
    marked = areas[areas > 0]
    assert len(set(marked.tolist())) > 1


def test_annotators_are_tighter_or_looser_and_faint_lesions_get_missed():
    faint_missed = 0
    for s in range(60):
        p = make_phantom(s, size=32)
        areas = p.masks.reshape(4, -1).sum(1)
        if not p.info["faint"]:
            assert not any(p.info["missed"])
            # thresholds increase with the annotator index: loosest first
            assert areas[0] >= areas[-1]
        elif any(p.info["missed"]):
            faint_missed += 1
            assert all(areas[k] == 0 for k in range(4) if p.info["missed"][k])
            assert not all(p.info["missed"])
    assert faint_missed > 0


def test_oracle_samples_draw_annotators():
    p = make_phantom(11, size=32)
    s = oracle_samples(p, 24, np.random.default_rng(0))
    assert s.shape == (24, 32, 32) and s.dtype == np.uint8
    for m in s:
        assert any(np.array_equal(m, a) for a in p.masks)
    np.testing.assert_array_equal(s, oracle_samples(p, 24, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="samples"):
        oracle_samples(p, 0, 0)
    # fresh annotations: new jitter, close to (but not exactly) the reference annotations
    f = oracle_samples(p, 8, 1, fresh=True)
    assert f.shape == (8, 32, 32) and f.dtype == np.uint8
    np.testing.assert_array_equal(f, oracle_samples(p, 8, 1, fresh=True))
    assert any(m.any() for m in f)


def test_make_phantom_rejects_bad_arguments():
    with pytest.raises(ValueError, match="16 pixels"):
        make_phantom(0, size=8)
    with pytest.raises(ValueError, match="n_annotators"):
        make_phantom(0, size=32, n_annotators=0)


# ---------------------------------------------------------------------------- LIDC layout
def test_lidc_layout_round_trip(tmp_path):
    p = make_phantom(2, size=32)
    rng = np.random.default_rng(0)
    big_img = rng.random((180, 180))
    big_masks = (rng.random((4, 180, 180)) > 0.7).astype(np.uint8)
    cases = [p, ("LIDC-0001", "z-10.0_c0", big_img, big_masks)]
    root = write_lidc_layout(tmp_path / "d", cases, {"description": "test"})
    assert (root / "images" / "phantom000002" / "000.png").is_file()
    assert (root / "gt" / "phantom000002" / "000_l3.png").is_file()
    assert (root / "gt" / "LIDC-0001" / "z-10.0_c0_l0.png").is_file()

    ds = load_lidc_layout(root)
    assert len(ds) == 2 and sorted(ds.cases()) == ["LIDC-0001", "phantom000002"]
    by_case = {it.case: it for it in ds}
    ph = by_case["phantom000002"]
    assert ph.slice == "000"
    np.testing.assert_allclose(ph.image, np.round(p.image * 255) / 255, atol=1e-6)
    np.testing.assert_array_equal(ph.masks, p.masks)
    assert ph.info["seed"] == 2  # per-case info travels in dataset.json
    big = by_case["LIDC-0001"]
    assert big.image.shape == (128, 128) and big.masks.shape == (4, 128, 128)  # 180 -> 128
    np.testing.assert_allclose(big.image, np.round(big_img[26:154, 26:154] * 255) / 255,
                               atol=1e-6)
    np.testing.assert_array_equal(big.masks, big_masks[:, 26:154, 26:154])
    assert load_lidc_layout(root, crop=False)[0].image.shape in ((180, 180), (32, 32))
    assert load_dataset(root).description["layout"] == "lidc"


def test_lidc_loader_conventions_binarise_and_16_bit(tmp_path):
    root = tmp_path / "d"
    (root / "images" / "c1").mkdir(parents=True)
    (root / "gt" / "c1").mkdir(parents=True)
    img16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    imsave(str(root / "images" / "c1" / "s1.png"), img16, check_contrast=False)
    lab = np.zeros((64, 64), np.uint8)
    lab[10:20, 10:20] = 1  # a label stored as 0/1, not 0/255
    imsave(str(root / "gt" / "c1" / "s1_l0.png"), lab, check_contrast=False)
    imsave(str(root / "gt" / "c1" / "s1_l1.png"), lab * 7, check_contrast=False)
    it = load_lidc_layout(root)[0]
    np.testing.assert_allclose(it.image, img16 / 65535.0, atol=1e-6)
    assert it.masks.shape == (2, 64, 64) and it.masks.dtype == np.uint8
    np.testing.assert_array_equal(it.masks[0], lab)
    np.testing.assert_array_equal(it.masks[1], lab)


def test_lidc_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_lidc_layout(tmp_path / "nope")
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="gt/ is missing"):
        load_lidc_layout(root)
    (root / "gt").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_lidc_layout(root)
    (root / "images" / "c1").mkdir()
    imsave(str(root / "images" / "c1" / "s1.png"), np.zeros((32, 32), np.uint8),
           check_contrast=False)
    with pytest.raises(ValueError, match=r"no masks for image images/c1/s1.png"):
        load_lidc_layout(root)
    (root / "gt" / "c1").mkdir()
    imsave(str(root / "gt" / "c1" / "s1_l0.png"), np.zeros((30, 32), np.uint8),
           check_contrast=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lidc_layout(root)
    imsave(str(root / "gt" / "c1" / "s1_l0.png"), np.zeros((32, 32), np.uint8),
           check_contrast=False)
    imsave(str(root / "gt" / "c1" / "s1_l2.png"), np.zeros((32, 32), np.uint8),
           check_contrast=False)
    with pytest.raises(ValueError, match="numbered"):
        load_lidc_layout(root)


# ---------------------------------------------------------------------------- generic folder
def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(str(path), arr, check_contrast=False)


def test_image_mask_folder_one_or_several_masks(tmp_path):
    root = tmp_path / "f"
    img = (np.arange(24 * 24).reshape(24, 24) % 256).astype(np.uint8)
    m = np.zeros((24, 24), np.uint8)
    m[4:9, 4:9] = 255
    _png(root / "images" / "a.png", img)
    _png(root / "masks" / "a.png", m)
    _png(root / "images" / "b.png", img)
    _png(root / "masks" / "b_0.png", m)
    _png(root / "masks" / "b_1.png", np.zeros_like(m))
    _png(root / "masks" / "b_2.png", m)
    _png(root / "images" / "c.png", img)
    _png(root / "masks" / "c" / "r1.png", m)
    _png(root / "masks" / "c" / "r2.png", m)
    np.save(root / "images" / "d.npy", img.astype(np.float32) / 255)
    np.save(root / "masks" / "d.npy", (m > 0).astype(np.uint8))
    _png(root / "images" / "p7" / "s1.png", img)  # nested: case p7
    _png(root / "masks" / "p7" / "s1_l0.png", m)
    ds = load_image_mask_folder(root)
    by = {(it.case, it.slice): it for it in ds}
    assert by[("a", "a")].masks.shape == (1, 24, 24)
    assert by[("b", "b")].masks.shape == (3, 24, 24)
    assert by[("b", "b")].masks[1].sum() == 0
    assert by[("c", "c")].masks.shape == (2, 24, 24)
    np.testing.assert_allclose(by[("d", "d")].image, img / 255.0, atol=1e-6)
    assert by[("p7", "s1")].masks.shape == (1, 24, 24)
    np.testing.assert_allclose(by[("a", "a")].image, img / 255.0, atol=1e-6)
    assert set(np.unique(by[("a", "a")].masks)) == {0, 1}
    assert load_dataset(root).description["layout"] == "images+masks"


def test_image_mask_folder_errors(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    with pytest.raises(ValueError, match="no images/ folder"):
        load_image_mask_folder(root)
    (root / "images").mkdir()
    with pytest.raises(ValueError, match="no masks/ folder"):
        load_image_mask_folder(root)
    (root / "masks").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_image_mask_folder(root)
    _png(root / "images" / "a.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"no mask for image images/a.png"):
        load_image_mask_folder(root)
    _png(root / "masks" / "a.png", np.zeros((16, 20), np.uint8))
    with pytest.raises(ValueError, match="shape mismatch.*16x20.*16x16"):
        load_image_mask_folder(root)
    with pytest.raises(ValueError, match="neither"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------- splits
def _multi_slice_dataset(n_cases=40, slices=3):
    items = [SegItem(np.zeros((4, 4), np.float32), np.zeros((1, 4, 4), np.uint8),
                     f"case{c:03d}", f"s{s}") for c in range(n_cases) for s in range(slices)]
    return SegDataset(items, {"layout": "test"})


def test_splits_by_case_never_leak():
    ds = _multi_slice_dataset()
    parts = {s: split_dataset(ds, s) for s in ("train", "val", "test")}
    cases = {s: set(p.cases()) for s, p in parts.items()}
    assert not cases["train"] & cases["val"]
    assert not cases["train"] & cases["test"]
    assert not cases["val"] & cases["test"]
    assert cases["train"] | cases["val"] | cases["test"] == set(ds.cases())
    assert sum(len(p) for p in parts.values()) == len(ds)
    for p in parts.values():  # every slice of a case lands in the same split
        for c in p.cases():
            assert sum(it.case == c for it in p) == 3
    assert len(cases["test"]) == 4 and len(cases["val"]) == 4
    assert len(split_dataset(ds, "all")) == len(ds)
    with pytest.raises(ValueError, match="unknown split"):
        split_dataset(ds, "holdout")


def test_splits_are_deterministic_and_order_free():
    cases = [f"c{i}" for i in range(30)]
    a = split_cases(cases, seed=1)
    b = split_cases(list(reversed(cases)), seed=1)
    assert {k: sorted(v) for k, v in a.items()} == {k: sorted(v) for k, v in b.items()}
    c = split_cases(cases, seed=2)
    assert sorted(a["test"]) != sorted(c["test"])
    small = split_cases(["x", "y", "z"])
    assert all(len(v) == 1 for v in small.values())


# ---------------------------------------------------------------------------- CLI
def test_cli_data_phantoms_seeds_differ(tmp_path):
    from napari_berdiff.cli import main

    assert main(["data", "phantoms", "--out", str(tmp_path / "a"), "--cases", "3",
                 "--seed", "1", "--size", "32"]) == 0
    assert main(["data", "phantoms", "--out", str(tmp_path / "b"), "--cases", "3",
                 "--seed", "2", "--size", "32"]) == 0
    assert main(["data", "phantoms", "--out", str(tmp_path / "c"), "--cases", "3",
                 "--seed", "1", "--size", "32"]) == 0
    a, b, c = (load_lidc_layout(tmp_path / x) for x in "abc")
    assert len(a) == 3 and a[0].masks.shape == (4, 32, 32)
    assert not set(a.cases()) & set(b.cases())
    assert not any(np.array_equal(x.image, y.image) for x in a for y in b)
    for x, y in zip(a, c):
        np.testing.assert_array_equal(x.image, y.image)
    doc = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert doc["generator"] == "napari_berdiff.data.phantoms" and doc["seed"] == 1
    # a non-empty output folder is refused
    assert main(["data", "phantoms", "--out", str(tmp_path / "a"), "--cases", "1"]) == 2
