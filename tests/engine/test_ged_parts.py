"""The presence / shape split of GED² (benchmarks/lidc_ged_parts.py) against brute force."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from napari_berdiff.uncertainty import ged2

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from lidc_ged_parts import ged_parts  # noqa: E402


def test_the_parts_sum_to_ged2_on_random_sets_with_empty_masks():
    rng = np.random.default_rng(0)
    for _ in range(100):
        s = rng.random((5, 6, 6)) < rng.random() * 0.3
        y = rng.random((4, 6, 6)) < rng.random() * 0.3
        s[rng.random(5) < 0.3] = False
        y[rng.random(4) < 0.4] = False
        parts = ged_parts(s, y)
        assert abs(parts["presence"] + parts["shape"] - ged2(s, y)) < 1e-12


def test_a_presence_mismatch_is_all_presence_and_a_shape_mismatch_all_shape():
    full = np.ones((1, 4, 4), bool)
    empty = np.zeros((1, 4, 4), bool)
    half = np.zeros((1, 4, 4), bool)
    half[0, :2] = True
    p = ged_parts(np.concatenate([empty, empty]), np.concatenate([full, full]))
    assert p == {"ged2": 2.0, "presence": 2.0, "shape": 0.0, "empty_samples": 1.0,
                 "empty_readers": 0.0}
    p = ged_parts(np.concatenate([half, half]), np.concatenate([full, full]))
    assert p["presence"] == 0.0 and p["shape"] == 2 * 0.5 and p["ged2"] == 1.0
