"""Tests for napari_berdiff.uncertainty: maps, BerDiff metrics, Dice/HD95, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from napari_berdiff import uncertainty as U

# --------------------------------------------------------------------------- helpers


def plain_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return np.logical_and(a, b).sum() / union


def random_masks(rng: np.random.Generator, n: int, shape=(6, 7), p=0.4, n_empty=0):
    masks = rng.random((n, *shape)) < p
    masks[:n_empty] = False
    return masks


def square(shape, top, left, size) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


# --------------------------------------------------------------------------- maps


def test_frequency_and_variance():
    rng = np.random.default_rng(0)
    masks = random_masks(rng, 9, (5, 8))
    f = U.frequency(masks)
    v = U.variance(masks)
    assert f.dtype == np.float32 and v.dtype == np.float32
    np.testing.assert_allclose(f, masks.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(v, f.astype(np.float64) * (1 - f), atol=1e-7)
    assert v.max() <= 0.25
    # half the samples on -> maximal variance
    half = np.stack([np.ones((3, 3))] * 2 + [np.zeros((3, 3))] * 2)
    np.testing.assert_allclose(U.variance(half), 0.25)


def test_binary_entropy_values():
    h = U.binary_entropy(np.array([0.0, 0.5, 1.0, 0.25]))
    assert h.dtype == np.float32
    expected_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    np.testing.assert_allclose(h, [0.0, 1.0, 0.0, expected_quarter], atol=1e-6)
    assert np.all(np.isfinite(h))


def test_entropy_of_half_probs_is_one_bit():
    probs = np.full((4, 6, 6), 0.5, dtype=np.float32)
    np.testing.assert_allclose(U.total_entropy(probs), 1.0, atol=1e-6)
    np.testing.assert_allclose(U.aleatoric_entropy(probs), 1.0, atol=1e-6)
    np.testing.assert_allclose(U.mutual_information(probs), 0.0, atol=1e-6)


def test_mutual_information_zero_when_samples_agree():
    probs = np.full((5, 4, 4), 0.3)
    mi = U.mutual_information(probs)
    np.testing.assert_allclose(mi, 0.0, atol=1e-6)
    assert mi.min() >= 0.0


def test_mutual_information_positive_when_confident_samples_disagree():
    probs = np.stack([np.full((4, 4), 0.01)] * 3 + [np.full((4, 4), 0.99)] * 3)
    mi = U.mutual_information(probs)
    h01 = -(0.01 * math.log2(0.01) + 0.99 * math.log2(0.99))
    np.testing.assert_allclose(mi, 1.0 - h01, atol=1e-5)
    assert mi.min() > 0.9


def test_total_is_aleatoric_plus_mi_and_bounds():
    rng = np.random.default_rng(1)
    probs = rng.random((8, 10, 10))
    tot, ale, mi = (
        U.total_entropy(probs),
        U.aleatoric_entropy(probs),
        U.mutual_information(probs),
    )
    np.testing.assert_allclose(tot, ale + mi, atol=1e-6)
    for m in (tot, ale, mi):
        assert m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() <= 1.0


def test_uncertainty_maps_without_and_with_probs():
    rng = np.random.default_rng(2)
    probs = rng.random((6, 5, 5)).astype(np.float32)
    masks = probs > 0.5
    maps = U.uncertainty_maps(masks)
    assert set(maps) == {"frequency", "variance", "entropy"}
    np.testing.assert_allclose(maps["entropy"], U.binary_entropy(maps["frequency"]), atol=1e-6)

    maps = U.uncertainty_maps(masks, probs)
    assert set(maps) == {"frequency", "variance", "entropy", "aleatoric", "mutual_information"}
    assert all(m.dtype == np.float32 and m.shape == (5, 5) for m in maps.values())
    np.testing.assert_allclose(maps["entropy"], U.total_entropy(probs), atol=1e-6)
    np.testing.assert_allclose(maps["aleatoric"], U.aleatoric_entropy(probs), atol=1e-6)
    np.testing.assert_allclose(
        maps["mutual_information"], U.mutual_information(probs), atol=1e-6
    )
    assert set(maps) <= set(U.MAP_LIMITS)
    for name, m in maps.items():
        lo, hi = U.MAP_LIMITS[name]
        assert lo <= m.min() and m.max() <= hi
    assert U.MAP_LIMITS["variance"] == (0.0, 0.25)


def test_maps_work_in_3d():
    rng = np.random.default_rng(3)
    probs = rng.random((4, 3, 5, 6))
    masks = probs > 0.5
    maps = U.uncertainty_maps(masks, probs)
    assert all(m.shape == (3, 5, 6) for m in maps.values())
    np.testing.assert_allclose(maps["frequency"], masks.mean(axis=0), atol=1e-7)


# --------------------------------------------------------------------------- pairwise IoU, GED


def test_iou_and_dice_hand_cases():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[:1, :2] = True  # 2 pixels, inside a
    assert U.iou(a, b) == pytest.approx(0.5)
    assert U.dice(a, b) == pytest.approx(2 * 2 / 6)
    empty = np.zeros((4, 4))
    assert U.iou(empty, empty) == 1.0
    assert U.dice(empty, empty) == 1.0
    assert U.iou(a, empty) == 0.0
    assert U.dice(a, empty) == 0.0
    assert U.iou(a.astype(np.uint8), a.astype(np.float32)) == 1.0


@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 5)], ids=["42px", "30px-3d"])
def test_pairwise_iou_matches_double_loop(shape):
    """Also for masks whose pixel count is no multiple of 8 (the packed bits' padding)."""
    rng = np.random.default_rng(4)
    A = random_masks(rng, 5, shape, n_empty=1)
    B = random_masks(rng, 4, shape, p=0.2, n_empty=2)
    got = U.pairwise_iou(A, B)
    assert got.shape == (5, 4)
    expected = np.array([[plain_iou(a, b) for b in B] for a in A])
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got[0, 0] == 1.0  # both empty


def brute_ged2(samples, labels) -> float:
    """Triple expectation written out plainly, with self-pairs, d = 1 - IoU (0 if both empty)."""

    def d(x, y):
        return 1.0 - plain_iou(x, y)

    n, k = len(samples), len(labels)
    e_ys = sum(d(y, s) for y in labels for s in samples) / (k * n)
    e_ss = sum(d(s, t) for s in samples for t in samples) / (n * n)
    e_yy = sum(d(y, z) for y in labels for z in labels) / (k * k)
    return 2 * e_ys - e_ss - e_yy


@pytest.mark.parametrize("seed", range(5))
def test_ged2_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(1, 7), rng.integers(1, 5)
    samples = random_masks(rng, n, (5, 6), p=rng.uniform(0.1, 0.6), n_empty=int(seed % 2))
    labels = random_masks(rng, k, (5, 6), p=rng.uniform(0.1, 0.6), n_empty=int(seed == 3))
    assert U.ged2(samples, labels) == pytest.approx(brute_ged2(samples, labels), abs=1e-10)


def test_ged2_hand_cases():
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 4, (8, 8))
    assert U.ged2(masks, masks.copy()) == pytest.approx(0.0, abs=1e-12)

    a = square((8, 8), 0, 0, 3)
    b = square((8, 8), 5, 5, 3)
    # one sample, one label, disjoint: 2*1 - 0 - 0
    assert U.ged2(a[None], b[None]) == pytest.approx(2.0)

    empty = np.zeros((3, 8, 8), bool)
    assert U.ged2(empty, empty[:2]) == 0.0

    # Samples {empty, A}, labels {A}:
    #   E d(Y,S)  = (d(A,empty) + d(A,A)) / 2 = (1 + 0) / 2 = 0.5
    #   E d(S,S') = (0 + 1 + 1 + 0) / 4               = 0.5
    #   E d(Y,Y') = 0
    #   GED^2 = 2*0.5 - 0.5 - 0 = 0.5
    assert U.ged2(np.stack([np.zeros((8, 8), bool), a]), a[None]) == pytest.approx(0.5)
    # Samples {empty}, labels {empty, A}: 2*0.5 - 0 - 0.5 = 0.5
    assert U.ged2(np.zeros((1, 8, 8)), np.stack([np.zeros((8, 8)), a])) == pytest.approx(0.5)


# --------------------------------------------------------------------------- HM-IoU


def brute_hm_iou(samples, labels) -> float:
    n, k = len(samples), len(labels)
    reps = -(-n // k)
    copies = [labels[j % k] for j in range(reps * k)]
    best = -1.0
    for perm in itertools.permutations(range(len(copies)), n):
        total = sum(plain_iou(samples[i], copies[j]) for i, j in enumerate(perm))
        best = max(best, total / n)
    return best


@pytest.mark.parametrize(
    "n,k", [(1, 1), (2, 1), (4, 2), (6, 3), (6, 2), (3, 2), (5, 2), (2, 4), (5, 3)]
)
def test_hm_iou_matches_permutation_brute_force(n, k):
    rng = np.random.default_rng(10 * n + k)
    samples = random_masks(rng, n, (5, 5), p=0.5, n_empty=int(n > 3))
    labels = random_masks(rng, k, (5, 5), p=0.5, n_empty=int(k > 2))
    assert U.hm_iou(samples, labels) == pytest.approx(brute_hm_iou(samples, labels), abs=1e-12)


def test_hm_iou_hand_cases():
    a = square((8, 8), 0, 0, 4)
    b = square((8, 8), 0, 0, 2)  # iou(a, b) = 4/16
    assert U.hm_iou(np.stack([a, a]), a[None]) == 1.0
    # labels {a} repeated twice; samples {a, b}: (1 + 0.25) / 2
    assert U.hm_iou(np.stack([a, b]), a[None]) == pytest.approx(0.625)
    # the matching pairs each sample with its own label
    assert U.hm_iou(np.stack([b, a]), np.stack([a, b])) == 1.0
    empty = np.zeros((2, 8, 8))
    assert U.hm_iou(empty, empty) == 1.0


def test_ged2_and_hm_iou_at_typical_size_match_a_float_matrix_product():
    """32 samples and 4 labels of 128×128 (their speed: benchmarks/bench_metrics.py)."""
    rng = np.random.default_rng(6)
    samples = rng.random((32, 128, 128)) < 0.3
    labels = rng.random((4, 128, 128)) < 0.3
    flat_s = samples.reshape(32, -1).astype(np.float64)
    flat_y = labels.reshape(4, -1).astype(np.float64)

    def iou(a, b):
        inter = a @ b.T
        return inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter)

    expected = 2 * (1 - iou(flat_y, flat_s)).mean() - (1 - iou(flat_s, flat_s)).mean() \
        - (1 - iou(flat_y, flat_y)).mean()
    assert U.ged2(samples, labels) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(U.pairwise_iou(samples, labels), iou(flat_s, flat_y))
    assert 0.0 <= U.hm_iou(samples, labels) <= 1.0


# --------------------------------------------------------------------------- soft Dice


def test_soft_dice_hand_case():
    a = square((6, 6), 1, 1, 3)
    labels = np.stack([a, np.zeros_like(a)])  # mean label: 0.5 on a
    probs = np.stack([a * 0.6] * 3)  # mean prediction: 0.6 on a
    # tau=.1: a vs a -> 1; .3: 1; .5: a vs empty -> 0; .7: empty vs empty -> 1; .9: 1
    assert U.soft_dice(probs, labels) == pytest.approx(0.8)
    assert U.soft_dice(probs, labels, thresholds=(0.5,)) == 0.0


def test_soft_dice_close_to_smoothed_reference():
    rng = np.random.default_rng(7)
    probs = rng.random((16, 12, 12))
    labels = rng.random((4, 12, 12)) < 0.4
    pred, lab = probs.mean(0), labels.mean(0)
    ref = []
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        o, m = (pred > t).ravel(), (lab > t).ravel()
        ref.append((2 * (o & m).sum() + 1e-6) / (o.sum() + m.sum() + 1e-6))
    assert U.soft_dice(probs, labels) == pytest.approx(np.mean(ref), abs=1e-6)
    assert U.soft_dice(labels, labels) == 1.0


# --------------------------------------------------------------------------- HD95


def brute_hd95(a, b, spacing=(1.0, 1.0)) -> float:
    def boundary(m):
        pad = np.pad(m, 1)
        out = np.zeros_like(m)
        for idx in zip(*np.nonzero(m)):
            p = tuple(i + 1 for i in idx)
            for ax in range(m.ndim):
                for step in (-1, 1):
                    q = list(p)
                    q[ax] += step
                    if not pad[tuple(q)]:
                        out[idx] = True
        return out

    pa = np.argwhere(boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(boundary(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hd95_offset_squares(k):
    a = square((40, 40), 10, 10, 16)
    b = square((40, 40), 10, 10 + k, 16)  # shifted k pixels along the last axis
    assert U.hd95(a, b) == pytest.approx(k)
    assert U.hd95(b, a) == pytest.approx(k)
    assert U.hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(2.0 * k)
    assert U.hd95(a, b, spacing=(3.0, 1.0)) == pytest.approx(k)
    assert U.hd95(a, b, spacing=0.5) == pytest.approx(0.5 * k)


def test_hd95_hand_cases_and_empty():
    p = np.zeros((10, 10), bool)
    q = np.zeros((10, 10), bool)
    p[0, 0] = True
    q[3, 4] = True
    assert U.hd95(p, q) == pytest.approx(5.0)
    assert U.hd95(p, p) == 0.0
    empty = np.zeros((10, 10))
    assert U.hd95(empty, empty) == 0.0
    assert math.isnan(U.hd95(p, empty))
    assert math.isnan(U.hd95(empty, q))


def test_hd95_3d_cube():
    a = np.zeros((20, 20, 20), bool)
    a[5:13, 5:13, 5:13] = True
    b = np.roll(a, 2, axis=0)
    assert U.hd95(a, b) == pytest.approx(2.0)
    assert U.hd95(a, b, spacing=(2.5, 1.0, 1.0)) == pytest.approx(5.0)


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((12, 11)) < 0.3
    b = rng.random((12, 11)) < 0.3
    spacing = (1.0, 1.7)
    assert U.hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), abs=1e-9)


# --------------------------------------------------------------------------- bad input

GOOD = np.zeros((3, 4, 4), bool)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: U.ged2(GOOD, np.zeros((2, 4, 5))), "spatial shapes differ"),
        (lambda: U.hm_iou(GOOD, np.zeros((2, 5, 4))), "spatial shapes differ"),
        (lambda: U.pairwise_iou(GOOD, np.zeros((2, 4)) > 0), "spatial shapes differ"),
        (lambda: U.soft_dice(GOOD, np.zeros((2, 3, 4))), "spatial shapes differ"),
        (lambda: U.iou(np.zeros((4, 4)), np.zeros((4, 5))), "shapes differ"),
        (lambda: U.dice(np.zeros((4, 4)), np.zeros((5, 4))), "shapes differ"),
        (lambda: U.hd95(np.zeros((4, 4)), np.zeros((4, 4, 1))), "shapes differ"),
        (
            lambda: U.uncertainty_maps(GOOD, np.zeros((2, 4, 4))),
            "does not match masks shape",
        ),
        (lambda: U.ged2(np.zeros((0, 4, 4)), GOOD), "samples is empty"),
        (lambda: U.hm_iou(GOOD, np.zeros((0, 4, 4))), "labels is empty"),
        (lambda: U.frequency(np.zeros((0, 4, 4))), "masks is empty"),
        (lambda: U.soft_dice(GOOD, np.zeros((0, 4, 4))), "labels is empty"),
        (lambda: U.frequency(np.zeros(4)), "leading sample axis"),
        (lambda: U.ged2(np.full((2, 4, 4), 0.5), GOOD), "samples must be binary"),
        (lambda: U.hm_iou(GOOD, np.full((2, 4, 4), 2)), "labels must be binary"),
        (lambda: U.frequency(np.full((2, 4, 4), -1)), "masks must be binary"),
        (lambda: U.variance(np.full((2, 4, 4), 0.3)), "masks must be binary"),
        (lambda: U.iou(np.full((4, 4), 0.2), np.zeros((4, 4))), "a must be binary"),
        (lambda: U.hd95(np.zeros((4, 4)), np.full((4, 4), 3)), "b must be binary"),
        (lambda: U.soft_dice(GOOD, np.full((2, 4, 4), 0.5)), "labels must be binary"),
        (lambda: U.binary_entropy(np.array([0.5, 1.2])), r"probabilities in \[0, 1\]"),
        (lambda: U.total_entropy(np.full((2, 4, 4), -0.1)), r"probabilities in \[0, 1\]"),
        (lambda: U.aleatoric_entropy(np.full((2, 4, 4), 1.5)), r"probabilities in \[0, 1\]"),
        (lambda: U.mutual_information(np.full((2, 4, 4), 2.0)), r"probabilities in \[0, 1\]"),
        (lambda: U.soft_dice(np.full((2, 4, 4), 1.1), GOOD), r"probabilities in \[0, 1\]"),
        (
            lambda: U.uncertainty_maps(GOOD, np.full((3, 4, 4), -0.5)),
            r"probabilities in \[0, 1\]",
        ),
        (lambda: U.binary_entropy(np.array([0.5, np.nan])), "contains NaN"),
        (lambda: U.total_entropy(np.full((2, 4, 4), np.nan)), "probs contains NaN"),
        (lambda: U.ged2(np.full((2, 4, 4), np.nan), GOOD), "samples contains NaN"),
        (lambda: U.dice(np.full((4, 4), np.nan), np.zeros((4, 4))), "a contains NaN"),
        (lambda: U.soft_dice(GOOD, GOOD, thresholds=()), "thresholds is empty"),
        (lambda: U.soft_dice(GOOD, GOOD, thresholds=(0.5, 1.5)), "thresholds must lie"),
        (
            lambda: U.hd95(np.ones((4, 4)), np.ones((4, 4)), spacing=(1, 1, 1)),
            "one entry per axis",
        ),
        (
            lambda: U.hd95(np.ones((4, 4)), np.ones((4, 4)), spacing=(1, -1)),
            "spacing must be positive",
        ),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
