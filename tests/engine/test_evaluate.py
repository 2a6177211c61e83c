"""Evaluation: metric plumbing, references (oracle, annotators, constant), JSON and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_berdiff.data.dataset import SegDataset, SegItem
from napari_berdiff.data.phantoms import make_phantom
from napari_berdiff.training.evaluate import (
    constant_method,
    evaluate_methods,
    format_table,
    hm_iou_leave_one_out,
    item_metrics,
    mean_pair_dice,
)


def _phantoms(n=6, size=32) -> SegDataset:
    items = []
    for s in range(n):
        p = make_phantom(100 + s, size=size)
        items.append(SegItem(p.image, p.masks, f"c{s}", "0", info=p.info))
    return SegDataset(items, {"layout": "phantoms"})


def test_item_metrics_extremes():
    y = np.zeros((4, 8, 8), np.uint8)
    y[:, 2:6, 2:6] = 1
    same = item_metrics(np.repeat(y[:1], 8, 0), y)
    assert same["ged2"] == pytest.approx(0.0, abs=1e-12)
    assert same["hm_iou"] == pytest.approx(1.0)
    assert same["soft_dice"] == pytest.approx(1.0)
    assert same["dice"] == pytest.approx(1.0) and same["mv_dice"] == pytest.approx(1.0)
    empty = item_metrics(np.zeros((8, 8, 8), np.uint8), y)
    assert empty["ged2"] == pytest.approx(2.0)
    assert empty["hm_iou"] == 0.0 and empty["dice"] == 0.0 and empty["mv_dice"] == 0.0
    # Dice of two empty masks is 1
    assert mean_pair_dice(np.zeros((2, 4, 4)), np.zeros((3, 4, 4))) == 1.0


def test_majority_vote_dice_scores_the_vote_against_each_label():
    """3 of 5 samples cover a 4x4 square, 2 cover a 2x2 corner of it: the vote is the square."""
    s = np.zeros((5, 8, 8), np.uint8)
    s[:3, 2:6, 2:6] = 1
    s[3:, 2:4, 2:4] = 1
    y = np.zeros((2, 8, 8), np.uint8)
    y[0, 2:6, 2:6] = 1  # the square: Dice 1
    y[1, 2:6, 2:4] = 1  # half of it: Dice 2*8/(16+8)
    assert item_metrics(s, y)["mv_dice"] == pytest.approx((1 + 16 / 24) / 2)


def test_oracle_beats_a_constant_mask_and_json_is_keyed_by_method(tmp_path):
    ds = _phantoms()
    disc = np.zeros((32, 32), np.uint8)
    yy, xx = np.mgrid[:32, :32]
    disc[(yy - 16) ** 2 + (xx - 16) ** 2 < 36] = 1
    rep = evaluate_methods(ds, {"model": constant_method(disc)}, n=8, seed=0)
    s = rep.summary()
    assert s["oracle"]["ged2"] < s["model"]["ged2"]
    assert s["oracle"]["hm_iou"] > s["model"]["hm_iou"]
    assert s["oracle"]["n_items"] == len(ds)
    # phantoms: a perfect model of the mask distribution (fresh annotations) is also scored
    assert s["oracle"]["ged2"] <= s["oracle_fresh"]["ged2"] < s["model"]["ged2"]
    for k in range(4):
        assert f"annotator_{k}" in s
    best = s["best_annotator"]
    assert best["ged2"] == min(s[f"annotator_{k}"]["ged2"] for k in range(4))
    # the oracle's only error is finite sampling; a repeated annotator has no diversity
    assert s["oracle"]["ged2"] < best["ged2"]
    assert "ged2_gap_closed" in s["model"]
    doc = json.loads(rep.to_json(tmp_path / "e.json"))
    assert {"model", "oracle", "annotator_0", "annotator_3", "best_annotator"} <= set(doc)
    table = format_table(s)
    assert "oracle" in table and "GED²" in table
    # reproducible
    rep2 = evaluate_methods(ds, {"model": constant_method(disc)}, n=8, seed=0)
    assert rep2.summary()["oracle"] == s["oracle"]


def _brute_hm_iou(samples, labels):
    """Mean IoU of the best one-to-one assignment of samples to labels repeated to N, by
    trying every permutation (N = 4 samples only)."""
    from itertools import permutations

    reps = np.concatenate([labels] * -(-len(samples) // len(labels)))

    def iou(a, b):
        u = np.logical_or(a, b).sum()
        return 1.0 if u == 0 else np.logical_and(a, b).sum() / u

    m = np.array([[iou(a, b) for b in reps] for a in samples])
    return max(m[range(len(samples)), list(p)].mean()
               for p in permutations(range(len(reps)), len(samples)))


def test_leave_one_out_hm_iou_matches_brute_force_and_removes_self_matches():
    rng = np.random.default_rng(0)
    labels = (rng.random((3, 6, 6)) < 0.5).astype(np.uint8)
    samples = (rng.random((4, 6, 6)) < 0.5).astype(np.uint8)
    brute = np.mean([_brute_hm_iou(samples, np.delete(labels, j, 0)) for j in range(3)])
    assert hm_iou_leave_one_out(samples, labels) == pytest.approx(brute)
    own = np.repeat(labels[1:2], 4, 0)
    assert item_metrics(own, labels)["hm_iou"] > hm_iou_leave_one_out(own, labels, own=1)
    assert hm_iou_leave_one_out(own, labels, own=1) == pytest.approx(
        _brute_hm_iou(own, labels[[0, 2]]))
    assert np.isnan(hm_iou_leave_one_out(samples, labels[:1]))


def test_report_scores_annotators_against_the_others():
    ds = _phantoms(3)
    rep = evaluate_methods(ds, {"model": constant_method(ds[0].masks[0])}, n=8, seed=0)
    for k in range(4):
        expect = [hm_iou_leave_one_out(np.repeat(it.masks[k:k + 1], 8, 0), it.masks, own=k)
                  for it in ds]
        assert rep.per_item[f"annotator_{k}"]["hm_iou_loo"] == pytest.approx(expect)
    s = rep.summary()
    assert s["best_annotator_loo"]["hm_iou_loo"] == max(
        s[f"annotator_{k}"]["hm_iou_loo"] for k in range(4))
    model = [hm_iou_leave_one_out(np.repeat(ds[0].masks[:1], 8, 0), it.masks) for it in ds]
    assert rep.per_item["model"]["hm_iou_loo"] == pytest.approx(model)


def test_bad_method_output_and_empty_data_are_errors():
    ds = _phantoms(2)
    with pytest.raises(ValueError, match="returned masks of shape"):
        evaluate_methods(ds, {"model": lambda img, n, seed: np.zeros((n, 5, 5))}, n=2)
    with pytest.raises(ValueError, match="empty"):
        evaluate_methods(SegDataset([]), {}, n=2)


def test_cli_evaluate_model_and_baseline(tmp_path):
    from napari_berdiff.cli import main

    d = tmp_path / "data"
    assert main(["data", "phantoms", "--out", str(d), "--cases", "4", "--size", "16"]) == 0
    tiny = ["--base-channels", "8", "--channel-mult", "1,2", "--res-blocks", "1",
            "--attention", "", "--norm-groups", "4", "--batch-size", "2", "--steps", "2",
            "--threads", "1", "--quiet", "--split", "all"]
    m, b = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    assert main(["train", "--data", str(d), "--kind", "bernoulli", "-o", str(m),
                 "--timesteps", "20", "--sampling-steps", "3"] + tiny) == 0
    assert main(["train", "--data", str(d), "--kind", "deterministic", "-o", str(b)] + tiny) == 0
    js = tmp_path / "e.json"
    assert main(["evaluate", "--model", str(m), "--data", str(d), "--n", "4", "--split", "all",
                 "--baseline", str(b), "--json", str(js), "--threads", "1", "--quiet"]) == 0
    doc = json.loads(js.read_text())
    assert {"model", "deterministic", "oracle", "annotator_0", "annotator_3"} <= set(doc)
    assert doc["_settings"]["n"] == 4 and doc["_settings"]["n_items"] == 4
    assert doc["oracle"]["ged2"] < 0.5
    # the baseline must be a segmentor
    assert main(["evaluate", "--model", str(b), "--data", str(d), "--baseline", str(m),
                 "--split", "all", "--quiet"]) == 2
    assert main(["evaluate", "--model", str(tmp_path / "nope.safetensors"), "--data",
                 str(d), "--quiet"]) == 2
