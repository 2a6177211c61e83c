"""Prior maps for the refiner: a binary mask (drawn, edited or predicted) turned into p.

``mask_to_prior`` softens a mask's boundary with its signed distance: p is near 0 or 1 far
from the edge and near 1/2 at it, and ``trust`` sets how soft. ``degrade_mask`` makes the
imperfect masks a refiner is trained on (dilated, eroded, jittered, parts missing, extra
blobs), seeded so that a run is reproducible.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["MAX_SOFTNESS_PX", "mask_to_prior", "signed_distance", "degrade_mask",
           "validate_prior"]

#: The logistic scale (pixels) of the softened boundary at trust = 0.
MAX_SOFTNESS_PX = 4.0


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance (pixels) of every pixel centre to the mask's boundary.

    Positive inside, negative outside, ±0.5 for pixels next to the boundary; an empty mask
    is −inf everywhere and a full one +inf.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        return np.full(m.shape, -np.inf, dtype=np.float32)
    if m.all():
        return np.full(m.shape, np.inf, dtype=np.float32)
    inside = ndimage.distance_transform_edt(m)
    outside = ndimage.distance_transform_edt(~m)
    return np.where(m, inside - 0.5, -(outside - 0.5)).astype(np.float32)


def validate_prior(prior: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Check a prior mask or probability map; returns it as a 2-D float32 array.

    Raises ``ValueError`` with a message a user can act on for a wrong shape, NaNs, values
    outside [0, 1] or an empty prior.
    """
    p = np.asarray(prior)
    if p.ndim != 2:
        raise ValueError(f"the prior must be a 2-D mask (one slice); got shape {p.shape}")
    if shape is not None and tuple(p.shape) != tuple(shape):
        raise ValueError(f"the prior's shape {tuple(p.shape)} does not match the image's "
                         f"{tuple(shape)}; draw or pick a mask on the same image")
    p = p.astype(np.float32)
    if not np.isfinite(p).all():
        raise ValueError("the prior contains NaN or infinite values")
    if p.min() < 0 or p.max() > 1:
        # Labels layers hold label ids: any non-zero label is the object.
        p = (p > 0).astype(np.float32)
    if not p.any():
        raise ValueError("the prior is empty: draw (or predict) a rough mask of the object "
                         "first, then refine it")
    return p


def mask_to_prior(mask: np.ndarray, trust: float = 0.7) -> np.ndarray:
    """A prior probability map from a binary mask.

    ``p = sigmoid(d / s)`` with ``d`` the signed distance to the boundary and
    ``s = (1 − trust) · MAX_SOFTNESS_PX``; ``trust = 1`` returns the mask itself (0/1).
    For every pixel ``|p − 1/2|`` grows with ``trust`` (monotone) and p stays on the mask's
    side of 1/2.

    Parameters
    ----------
    mask
        2-D mask; any non-zero value is the object.
    trust
        In [0, 1]: how far the mask's boundary is believed.
    """
    if not 0.0 <= float(trust) <= 1.0:
        raise ValueError(f"trust must lie in [0, 1], got {trust}")
    m = np.asarray(mask) > 0
    if float(trust) >= 1.0:
        return m.astype(np.float32)
    scale = (1.0 - float(trust)) * MAX_SOFTNESS_PX
    d = signed_distance(m).astype(np.float64)
    with np.errstate(over="ignore"):
        p = 1.0 / (1.0 + np.exp(-d / scale))
    return p.astype(np.float32)


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy**2 + xx**2) <= r * r


def degrade_mask(mask: np.ndarray, rng: np.random.Generator,
                 strength: float = 1.0) -> np.ndarray:
    """An imperfect copy of ``mask``, as a rough drawing or a weak segmentor gives.

    One or more of: dilation or erosion by 1–3 px, a boundary jitter (a smooth random
    displacement field), a missing wedge, an extra blob near the object. ``strength``
    scales the sizes. Returns a uint8 mask of the same shape.
    """
    m = np.asarray(mask) > 0
    h, w = m.shape
    out = m.copy()
    ops = rng.permutation(4)[: int(rng.integers(1, 4))]
    for op in ops:
        if op == 0 and out.any():  # dilate or erode
            r = max(1, int(round(rng.integers(1, 4) * strength)))
            if rng.random() < 0.5:
                out = ndimage.binary_dilation(out, _disk(r))
            else:
                eroded = ndimage.binary_erosion(out, _disk(r))
                out = eroded if eroded.any() else out
        elif op == 1:  # jitter the boundary with a smooth displacement field
            amp = 2.0 * strength
            dy = ndimage.gaussian_filter(rng.normal(size=(h, w)), 4) * amp * 8
            dx = ndimage.gaussian_filter(rng.normal(size=(h, w)), 4) * amp * 8
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
            out = ndimage.map_coordinates(out.astype(np.float32), [yy + dy, xx + dx],
                                          order=1, mode="nearest") > 0.5
        elif op == 2 and out.sum() > 20:  # a missing wedge through the object's centre
            cy, cx = ndimage.center_of_mass(out)
            yy, xx = np.mgrid[0:h, 0:w]
            ang = np.arctan2(yy - cy, xx - cx)
            a0 = rng.uniform(-np.pi, np.pi)
            width = rng.uniform(0.3, 0.9) * strength
            diff = np.angle(np.exp(1j * (ang - a0)))
            cut = out & (np.abs(diff) < width / 2)
            if cut.sum() < out.sum():
                out = out & ~cut
        elif op == 3:  # an extra blob near the object
            ys, xs = np.nonzero(m) if m.any() else (np.array([h // 2]), np.array([w // 2]))
            k = int(rng.integers(len(ys)))
            r = max(1.5, rng.uniform(1.5, 4.0) * strength)
            off = rng.normal(size=2) * r * 2
            cy, cx = ys[k] + off[0], xs[k] + off[1]
            yy, xx = np.mgrid[0:h, 0:w]
            out = out | ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    return out.astype(np.uint8)
