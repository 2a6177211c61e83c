"""A scripted annotator for benchmarking interactive correction (issue 23).

As in the click simulations of interactive-segmentation papers, each round corrects the
largest error region: the annotator places one round brush stroke at the point of that
region farthest from its border, painting the value the region lacks (foreground for a
missed region, background for a false one). The brush radius is bounded, and the stroke
stays inside the region (its radius is at most the distance to the region's border), as
a careful annotator's would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Stroke", "corrective_stroke", "apply_stroke"]


@dataclass(frozen=True)
class Stroke:
    """One brush stroke: centre (row, column), radius in pixels, painted value (0 or 1),
    and the area of the error region it was aimed at."""

    row: int
    col: int
    radius: float
    value: int
    region_px: int

    def disc(self, shape: tuple[int, int]) -> np.ndarray:
        """The stroke's pixels as a boolean (H, W) mask."""
        yy, xx = np.ogrid[: shape[0], : shape[1]]
        return (yy - self.row) ** 2 + (xx - self.col) ** 2 <= self.radius ** 2


def corrective_stroke(mask: np.ndarray, target: np.ndarray, max_radius: float = 4.0
                      ) -> Stroke | None:
    """The stroke that corrects the largest error region of ``mask`` against ``target``
    (None when they agree).

    The error regions are the 8-connected components of the false negatives and of the
    false positives, taken separately; the largest by area is corrected.
    """
    m, t = np.asarray(mask, bool), np.asarray(target, bool)
    if m.shape != t.shape:
        raise ValueError(f"mask {m.shape} and target {t.shape} differ in shape")
    best: tuple[int, np.ndarray, int] | None = None
    for error, value in ((t & ~m, 1), (m & ~t, 0)):
        labels, count = ndimage.label(error, structure=np.ones((3, 3)))
        if not count:
            continue
        areas = np.bincount(labels.ravel())[1:]
        k = int(np.argmax(areas))
        if best is None or areas[k] > best[0]:
            best = (int(areas[k]), labels == k + 1, value)
    if best is None:
        return None
    area, region, value = best
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    radius = float(min(max_radius, max(dist[r, c] - 1.0, 0.0)))
    return Stroke(int(r), int(c), radius, value, area)


def apply_stroke(mask: np.ndarray, stroke: Stroke) -> np.ndarray:
    """A copy of ``mask`` with the stroke painted."""
    out = np.array(mask, dtype=bool, copy=True)
    out[stroke.disc(out.shape)] = bool(stroke.value)
    return out
