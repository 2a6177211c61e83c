"""The cDAL generator's energy loss: GED's distance, checked against the project's scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_berdiff.training.energy import energy_score, soft_jaccard_distance
from napari_berdiff.uncertainty import ged2, iou


def _masks(rng: np.random.Generator, n: int, empty: int = 0) -> np.ndarray:
    out = np.zeros((n, 12, 12), bool)
    for i in range(n - empty):
        r, c, h, w = rng.integers(0, 6, 4)
        out[i, r:r + h + 2, c:c + w + 2] = True
    return out


def test_distance_is_one_minus_iou_on_binary_masks_and_zero_for_two_empties():
    rng = np.random.default_rng(0)
    m = _masks(rng, 6, empty=2)
    t = torch.from_numpy(m.reshape(6, -1)).float()
    d = soft_jaccard_distance(t[:, None], t[None, :], eps=1e-9).numpy()
    brute = np.array([[1 - iou(a, b) if (a.any() or b.any()) else 0.0 for b in m] for a in m])
    np.testing.assert_allclose(d, brute, atol=1e-6)
    assert d[4, 5] == 0 and d[0, 4] == pytest.approx(1.0)


def test_mean_score_over_the_readers_equals_the_ged_terms():
    """mean_j ES(S, y_j) = ½·(GED² + E d(Y, Y')) + ½·(E_all d(S, S') − E_{k≠l} d(S, S'))."""
    rng = np.random.default_rng(1)
    s, y = _masks(rng, 5, empty=1), _masks(rng, 4, empty=1)
    st = torch.from_numpy(s.reshape(1, 5, -1)).float()
    es = np.mean([float(energy_score(st, torch.from_numpy(yy.reshape(1, -1)).float(),
                                     eps=1e-9)[0]) for yy in y])

    def d(a, b):
        return 1 - iou(a, b) if (a.any() or b.any()) else 0.0
    d_yy = np.mean([[d(a, b) for b in y] for a in y])
    d_ss = np.array([[d(a, b) for b in s] for a in s])
    off = d_ss.sum() / (5 * 4)
    assert es == pytest.approx(0.5 * (ged2(s, y) + d_yy) + 0.5 * (d_ss.mean() - off), abs=1e-6)


def test_samples_that_differ_as_the_readers_do_score_better_than_their_mean_or_one_mode():
    """Two readers who disagree: the pair (A, B) beats A twice and the soft mean mask."""
    a = torch.zeros(64)
    b = torch.zeros(64)
    a[:20], b[10:30] = 1, 1
    readers = [a, b]

    def expected(samples: torch.Tensor) -> float:
        return float(np.mean([float(energy_score(samples[None], y[None])[0]) for y in readers]))
    both = expected(torch.stack([a, b]))
    one = expected(torch.stack([a, a]))
    mean = expected(torch.stack([(a + b) / 2, (a + b) / 2]))
    assert both < one and both < mean


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="K >= 2"):
        energy_score(torch.zeros(2, 1, 9), torch.zeros(2, 9))
