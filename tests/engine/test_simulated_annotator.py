"""The scripted annotator of the interactive-correction benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from napari_berdiff.simulated_annotator import apply_stroke, corrective_stroke


def test_the_largest_error_region_is_corrected_from_inside():
    target = np.zeros((40, 40), bool)
    target[5:25, 5:25] = True          # a 20×20 lesion
    mask = target.copy()
    mask[5:25, 5:11] = False           # 120 px missed on its left
    mask[30:34, 30:34] = True          # a 16 px false blob
    s = corrective_stroke(mask, target, max_radius=4)
    assert s.value == 1 and s.region_px == 120
    disc = s.disc(mask.shape)
    assert disc.any() and (disc <= (target & ~mask)).all()   # stays inside the missed part
    assert s.radius <= 4
    fixed = apply_stroke(mask, s)
    assert (fixed & ~target).sum() == (mask & ~target).sum()  # no new false positive
    assert (target & ~fixed).sum() < (target & ~mask).sum()


def test_false_positives_are_erased_and_agreement_ends_the_loop():
    target = np.zeros((20, 20), bool)
    mask = target.copy()
    mask[2:12, 2:12] = True
    s = corrective_stroke(mask, target, max_radius=3)
    assert s.value == 0 and s.region_px == 100
    after = apply_stroke(mask, s)
    assert after.sum() < mask.sum() and not (after & ~mask).any()
    assert corrective_stroke(target, target) is None
    with pytest.raises(ValueError, match="differ in shape"):
        corrective_stroke(mask, target[:10])


def test_repeated_strokes_converge_to_the_target():
    rng = np.random.default_rng(0)
    target = np.zeros((32, 32), bool)
    target[8:24, 6:26] = True
    mask = rng.random((32, 32)) < 0.02   # about 20 scattered false pixels, and the lesion missed
    errors = [(mask ^ target).sum()]
    for _ in range(400):
        s = corrective_stroke(mask, target, max_radius=4)
        if s is None:
            break
        mask = apply_stroke(mask, s)
        errors.append((mask ^ target).sum())
    assert errors[-1] == 0
    assert all(b < a for a, b in zip(errors, errors[1:]))
