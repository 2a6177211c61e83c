"""Priors for the refiner: masks → p (monotone in trust), validation, degradation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_berdiff.data.phantoms import make_phantom
from napari_berdiff.priors import degrade_mask, mask_to_prior, signed_distance, validate_prior

TRUSTS = (0.0, 0.2, 0.5, 0.7, 0.9, 0.99, 1.0)


def _masks() -> list[np.ndarray]:
    out = [make_phantom(s, 32).masks[k] > 0 for s, k in ((1, 0), (2, 3), (7, 1))]
    yy, xx = np.mgrid[0:32, 0:32]
    out.append(((yy - 10) ** 2 + (xx - 20) ** 2 < 30) | ((yy > 25) & (xx < 6)))  # two parts
    out.append(np.zeros((32, 32), bool))
    out.append(np.ones((32, 32), bool))
    return [m for m in out]


@pytest.mark.parametrize("i", range(6))
def test_mask_to_prior_is_monotone_in_trust_and_stays_on_the_masks_side(i):
    mask = _masks()[i]
    assert mask_to_prior(mask, 0.5).dtype == np.float32
    ps = [mask_to_prior(mask, t).astype(np.float64) for t in TRUSTS]
    for lo, hi in zip(ps, ps[1:]):
        assert (np.abs(hi - 0.5) >= np.abs(lo - 0.5) - 1e-7).all()
    for p in ps:
        assert ((p >= 0) & (p <= 1)).all()
        assert ((p > 0.5) == mask).all()  # same side of 1/2 as the mask, at every trust
    np.testing.assert_array_equal(ps[-1], mask.astype(np.float64))  # trust 1: the mask


def test_mask_to_prior_softens_the_boundary_most_at_low_trust():
    mask = _masks()[0]
    d = signed_distance(mask)
    edge = np.abs(d) == 0.5
    far = np.abs(d) >= 6
    p0, p7 = mask_to_prior(mask, 0.0), mask_to_prior(mask, 0.7)
    assert np.abs(p0[edge] - 0.5).max() < 0.15  # near 1/2 at the edge
    assert np.abs(p7[far] - mask[far]).max() < 0.01  # near 0/1 far from it
    with pytest.raises(ValueError, match="trust"):
        mask_to_prior(mask, 1.5)


def test_signed_distance_sign_convention():
    m = np.zeros((9, 9), bool)
    m[3:6, 3:6] = True
    d = signed_distance(m)
    assert d[4, 4] == 1.5 and d[3, 3] == 0.5 and d[2, 4] == -0.5
    assert (d[m] > 0).all() and (d[~m] < 0).all()


def test_validate_prior_gives_clear_messages():
    with pytest.raises(ValueError, match=r"shape \(8, 8\) does not match the image's \(16, 16\)"):
        validate_prior(np.ones((8, 8)), (16, 16))
    with pytest.raises(ValueError, match="the prior is empty"):
        validate_prior(np.zeros((16, 16)), (16, 16))
    with pytest.raises(ValueError, match="NaN"):
        validate_prior(np.full((16, 16), np.nan), (16, 16))
    with pytest.raises(ValueError, match="2-D"):
        validate_prior(np.ones((2, 16, 16)), (16, 16))
    labels = np.zeros((16, 16), np.int32)
    labels[4:8, 4:8] = 3  # a Labels layer's label id
    p = validate_prior(labels, (16, 16))
    assert p.dtype == np.float32 and set(np.unique(p)) == {0.0, 1.0}


def test_degrade_mask_is_seeded_and_changes_the_mask():
    mask = make_phantom(3, 64).masks[1] > 0
    a = degrade_mask(mask, np.random.default_rng(5))
    b = degrade_mask(mask, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == mask.shape
    changed = [(degrade_mask(mask, np.random.default_rng(s)) > 0) != mask for s in range(10)]
    assert sum(c.any() for c in changed) >= 6  # 7 of these 10 seeds change it
