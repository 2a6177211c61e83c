"""Per-pixel uncertainty maps over N samples and segmentation metrics (DESIGN §3.4).

Engine module: numpy / scipy only, no torch, Qt or napari.

Conventions
-----------
* A *mask* is a binary array (bool, or numbers that are exactly 0 or 1).
* A *set* (or stack) of masks has a leading sample axis: ``(N, ...)``; the trailing
  (spatial) shape may be 2D, 3D or anything else with at least one axis.
* ``probs`` are x̂0 probability maps in [0, 1], stacked the same way.
* Entropies are in **bits**, so a binary entropy lies in [0, 1].

Metrics follow the official BerDiff evaluation script (``test.py`` in
github.com/takimailto/BerDiff):

* distance ``d = 1 - IoU``, with ``d = 0`` (IoU = 1) when both masks are empty;
* ``GED² = 2·E d(Y, S) - E d(S, S') - E d(Y, Y')``, every expectation being a plain mean
  over *all* ordered pairs, self-pairs included;
* HM-IoU: labels repeated up to the sample count, Hungarian matching on the IoU matrix,
  mean matched IoU;
* soft Dice: mean over thresholds {.1, .3, .5, .7, .9} of the Dice between the thresholded
  mean prediction and the thresholded mean label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.special import xlogy

__all__ = [
    "MAP_LIMITS",
    "aleatoric_entropy",
    "binary_entropy",
    "dice",
    "frequency",
    "ged2",
    "hd95",
    "hm_iou",
    "iou",
    "majority_vote_dice",
    "mutual_information",
    "pairwise_iou",
    "soft_dice",
    "total_entropy",
    "uncertainty_maps",
    "variance",
]

#: Fixed display contrast limits for every map returned by :func:`uncertainty_maps`.
MAP_LIMITS: dict[str, tuple[float, float]] = {
    "frequency": (0.0, 1.0),
    "variance": (0.0, 0.25),
    "entropy": (0.0, 1.0),
    "aleatoric": (0.0, 1.0),
    "mutual_information": (0.0, 1.0),
}

_LN2 = math.log(2.0)

# --------------------------------------------------------------------------- validation


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind in "fc" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")


def _as_mask(x: npt.ArrayLike, name: str) -> np.ndarray:
    """Return ``x`` as a bool array, raising if it holds anything but 0/1/True/False."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "uifc":
        raise ValueError(f"{name} must be a numeric or bool mask, got dtype {arr.dtype}")
    _check_finite(arr, name)
    ok = (arr == 0) | (arr == 1)
    if not ok.all():
        bad = arr[~ok].flat[0]
        raise ValueError(
            f"{name} must be binary (only 0/1/True/False), found value {bad!r}"
        )
    return arr.astype(bool)


def _as_probs(x: npt.ArrayLike, name: str) -> np.ndarray:
    """Return ``x`` as a float array in [0, 1] (float32 stays float32, else float64)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "buif":
        raise ValueError(f"{name} must hold real probabilities, got dtype {arr.dtype}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float64)
    _check_finite(arr, name)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(
            f"{name} must be probabilities in [0, 1], found values in "
            f"[{float(arr.min())}, {float(arr.max())}]"
        )
    return arr


def _check_stack(arr: np.ndarray, name: str) -> None:
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must be a stack of masks with a leading sample axis, shape (N, ...), "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: it holds no masks (shape {arr.shape})")
    if math.prod(arr.shape[1:]) == 0:
        raise ValueError(f"{name} masks have no pixels (shape {arr.shape})")


def _mask_stack(x: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    _check_stack(arr, name)
    return _as_mask(arr, name)


def _prob_stack(x: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    _check_stack(arr, name)
    return _as_probs(arr, name)


def _same_spatial(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"spatial shapes differ: {name_a} has masks of shape {a.shape[1:]}, "
            f"{name_b} has masks of shape {b.shape[1:]}"
        )


def _pair(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    ma, mb = _as_mask(a, "a"), _as_mask(b, "b")
    if ma.shape != mb.shape:
        raise ValueError(f"shapes differ: a has shape {ma.shape}, b has shape {mb.shape}")
    if ma.size == 0:
        raise ValueError("masks are empty arrays (no pixels)")
    return ma, mb


# --------------------------------------------------------------------------- maps


def frequency(masks: npt.ArrayLike) -> np.ndarray:
    """Per-pixel fraction of the N binary masks that are foreground.

    Parameters
    ----------
    masks
        Binary masks, shape ``(N, ...)``.

    Returns
    -------
    np.ndarray
        float32 map of shape ``masks.shape[1:]``, values in [0, 1].
    """
    m = _mask_stack(masks, "masks")
    return (np.count_nonzero(m, axis=0) / m.shape[0]).astype(np.float32)


def variance(masks: npt.ArrayLike) -> np.ndarray:
    """Per-pixel Bernoulli variance ``f(1 - f)`` of the masks, with ``f`` the frequency.

    Parameters
    ----------
    masks
        Binary masks, shape ``(N, ...)``.

    Returns
    -------
    np.ndarray
        float32 map in [0, 0.25].
    """
    f = frequency(masks).astype(np.float64)
    return (f * (1.0 - f)).astype(np.float32)


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits of a validated float array, computed in float64."""
    p = p.astype(np.float64, copy=False)
    h = -(xlogy(p, p) + xlogy(1.0 - p, 1.0 - p)) / _LN2
    return np.clip(h, 0.0, 1.0)


def binary_entropy(p: npt.ArrayLike) -> np.ndarray:
    """Entropy in bits of a Bernoulli variable with mean ``p``; 0 at p = 0 and p = 1.

    Parameters
    ----------
    p
        Probabilities in [0, 1], any shape.

    Returns
    -------
    np.ndarray
        float32 array of the same shape, values in [0, 1].
    """
    return _entropy_bits(_as_probs(p, "p")).astype(np.float32)


def _mean_probs(pr: np.ndarray) -> np.ndarray:
    return np.mean(pr, axis=0, dtype=np.float64)


def _aleatoric64(pr: np.ndarray) -> np.ndarray:
    acc = np.zeros(pr.shape[1:], dtype=np.float64)
    for sample in pr:  # one sample at a time keeps 3D volumes cheap in memory
        acc += _entropy_bits(sample)
    return acc / pr.shape[0]


def total_entropy(probs: npt.ArrayLike) -> np.ndarray:
    """Total predictive entropy ``H(mean_n x̂0_n)`` in bits.

    Parameters
    ----------
    probs
        x̂0 probability maps in [0, 1], shape ``(N, ...)``.

    Returns
    -------
    np.ndarray
        float32 map in [0, 1].
    """
    pr = _prob_stack(probs, "probs")
    return _entropy_bits(_mean_probs(pr)).astype(np.float32)


def aleatoric_entropy(probs: npt.ArrayLike) -> np.ndarray:
    """Aleatoric (expected) entropy ``mean_n H(x̂0_n)`` in bits.

    Parameters
    ----------
    probs
        x̂0 probability maps in [0, 1], shape ``(N, ...)``.

    Returns
    -------
    np.ndarray
        float32 map in [0, 1].
    """
    pr = _prob_stack(probs, "probs")
    return _aleatoric64(pr).astype(np.float32)


def _mi64(pr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    total = _entropy_bits(_mean_probs(pr))
    alea = _aleatoric64(pr)
    return total, alea, np.clip(total - alea, 0.0, 1.0)


def mutual_information(probs: npt.ArrayLike) -> np.ndarray:
    """Epistemic part: total entropy minus aleatoric entropy, in bits.

    Clipped at 0 to absorb float round-off (it is non-negative by Jensen's inequality).

    Parameters
    ----------
    probs
        x̂0 probability maps in [0, 1], shape ``(N, ...)``.

    Returns
    -------
    np.ndarray
        float32 map in [0, 1].
    """
    pr = _prob_stack(probs, "probs")
    return _mi64(pr)[2].astype(np.float32)


def uncertainty_maps(
    masks: npt.ArrayLike, probs: npt.ArrayLike | None = None
) -> dict[str, np.ndarray]:
    """All per-pixel uncertainty maps over N samples.

    Parameters
    ----------
    masks
        Binary sample masks, shape ``(N, ...)``.
    probs
        Optional x̂0 probability maps with the same shape as ``masks``.

    Returns
    -------
    dict[str, np.ndarray]
        float32 maps keyed ``frequency``, ``variance`` and ``entropy``; with ``probs`` also
        ``aleatoric`` and ``mutual_information``. ``entropy`` is ``H(mean probs)`` when
        ``probs`` is given and ``H(frequency)`` otherwise. Display limits: :data:`MAP_LIMITS`.
    """
    m = _mask_stack(masks, "masks")
    f = np.count_nonzero(m, axis=0) / m.shape[0]
    out = {
        "frequency": f.astype(np.float32),
        "variance": (f * (1.0 - f)).astype(np.float32),
    }
    if probs is None:
        out["entropy"] = _entropy_bits(f).astype(np.float32)
        return out
    pr = _prob_stack(probs, "probs")
    if pr.shape != m.shape:
        raise ValueError(
            f"probs shape {pr.shape} does not match masks shape {m.shape}"
        )
    total, alea, mi = _mi64(pr)
    out["entropy"] = total.astype(np.float32)
    out["aleatoric"] = alea.astype(np.float32)
    out["mutual_information"] = mi.astype(np.float32)
    return out


# --------------------------------------------------------------------------- overlap metrics


def iou(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Intersection over union of two binary masks of the same shape.

    Returns 1.0 when both masks are empty (so ``d = 1 - IoU`` is 0 there, as in BerDiff).
    """
    ma, mb = _pair(a, b)
    union = np.count_nonzero(ma | mb)
    if union == 0:
        return 1.0
    return np.count_nonzero(ma & mb) / union


def dice(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Dice coefficient ``2|a∩b| / (|a| + |b|)`` of two binary masks; 1.0 when both are empty."""
    ma, mb = _pair(a, b)
    denom = np.count_nonzero(ma) + np.count_nonzero(mb)
    if denom == 0:
        return 1.0
    return 2.0 * np.count_nonzero(ma & mb) / denom


def majority_vote_dice(samples: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Dice of the majority vote (frequency > ½, cDAL's consensus) of binary ``samples``
    (N, ...) with each of the binary ``labels`` (K, ...), averaged (1 for two empty masks)."""
    vote = (np.asarray(samples) > 0).mean(0) > 0.5
    return float(np.mean([dice(vote, lab) for lab in np.asarray(labels) > 0]))


def _pairwise_intersections(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Exact pixel counts of ``A[i] & B[j]`` (int64): the masks packed 8 pixels to a byte,
    ANDed and counted one row of ``A`` at a time. No BLAS: a float matrix product's speed
    depended on its threads getting cores (40× slower on a busy machine)."""
    pa = np.packbits(A.reshape(A.shape[0], -1), axis=1)
    pb = np.packbits(B.reshape(B.shape[0], -1), axis=1)
    out = np.empty((pa.shape[0], pb.shape[0]), np.int64)
    for i, row in enumerate(pa):
        out[i] = np.bitwise_count(row & pb).sum(axis=1, dtype=np.int64)
    return out


def _pairwise_iou_bool(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    inter = _pairwise_intersections(A, B).astype(np.float64)
    area_a = np.count_nonzero(A.reshape(A.shape[0], -1), axis=1).astype(np.float64)
    area_b = np.count_nonzero(B.reshape(B.shape[0], -1), axis=1).astype(np.float64)
    union = area_a[:, None] + area_b[None, :] - inter
    out = np.ones_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def pairwise_iou(A: npt.ArrayLike, B: npt.ArrayLike) -> np.ndarray:
    """IoU between every mask of ``A`` and every mask of ``B``.

    Parameters
    ----------
    A, B
        Binary mask stacks of shapes ``(NA, ...)`` and ``(NB, ...)`` with equal trailing shapes.

    Returns
    -------
    np.ndarray
        float64 matrix of shape ``(NA, NB)``; entries are 1.0 where both masks are empty.
    """
    ma, mb = _mask_stack(A, "A"), _mask_stack(B, "B")
    _same_spatial(ma, mb, "A", "B")
    return _pairwise_iou_bool(ma, mb)


def _sample_label_sets(
    samples: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    s, y = _mask_stack(samples, "samples"), _mask_stack(labels, "labels")
    _same_spatial(s, y, "samples", "labels")
    return s, y


def ged2(samples: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Squared generalised energy distance, as computed in BerDiff's ``test.py``.

    ``GED² = 2·E d(Y, S) - E d(S, S') - E d(Y, Y')`` with ``d = 1 - IoU`` (0 when both masks
    are empty); each expectation is the mean over all ordered pairs, self-pairs included.

    Parameters
    ----------
    samples
        Binary sample masks, shape ``(N, ...)``.
    labels
        Binary reference annotations, shape ``(K, ...)``.

    Returns
    -------
    float
        GED²; 0 for identical sets, at most 2.
    """
    s, y = _sample_label_sets(samples, labels)
    d_ys = 1.0 - _pairwise_iou_bool(y, s)
    d_ss = 1.0 - _pairwise_iou_bool(s, s)
    d_yy = 1.0 - _pairwise_iou_bool(y, y)
    return float(2.0 * d_ys.mean() - d_ss.mean() - d_yy.mean())


def hm_iou(samples: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Hungarian-matched IoU between N samples and K labels repeated to the sample count.

    The labels are repeated ``ceil(N / K)`` times and each sample is assigned to a distinct
    label copy so that the total IoU is maximal (``scipy.optimize.linear_sum_assignment``);
    the mean matched IoU over the N samples is returned. When K divides N this is exactly the
    official square N×N matching (BerDiff: K = 4 labels repeated 4 times for N = 16). When it
    does not, the matrix is N × (K·ceil(N/K)), i.e. every label may be used at most
    ``ceil(N/K)`` times, with no label copy favoured by its position. IoU of two empty masks is 1.

    Parameters
    ----------
    samples
        Binary sample masks, shape ``(N, ...)``.
    labels
        Binary reference annotations, shape ``(K, ...)``.

    Returns
    -------
    float
        Mean matched IoU in [0, 1].
    """
    s, y = _sample_label_sets(samples, labels)
    n, k = s.shape[0], y.shape[0]
    reps = -(-n // k)
    iou_sy = np.tile(_pairwise_iou_bool(s, y), (1, reps))  # (N, K·reps)
    rows, cols = linear_sum_assignment(iou_sy, maximize=True)
    return float(iou_sy[rows, cols].mean())


def soft_dice(
    samples_or_probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
) -> float:
    """Soft Dice: mean over thresholds τ of Dice(mean prediction > τ, mean label > τ).

    The official script adds a 1e-6 smoothing term to the Dice; here the Dice is exact, and
    1.0 when both thresholded masks are empty (the value the smoothing gives there).

    Parameters
    ----------
    samples_or_probs
        Binary sample masks or x̂0 probability maps in [0, 1], shape ``(N, ...)``.
    labels
        Binary reference annotations, shape ``(K, ...)``.
    thresholds
        Thresholds τ, each in [0, 1].

    Returns
    -------
    float
        Soft Dice in [0, 1].
    """
    pr = _prob_stack(samples_or_probs, "samples_or_probs")
    y = _mask_stack(labels, "labels")
    _same_spatial(pr, y, "samples_or_probs", "labels")
    taus = np.asarray(thresholds, dtype=np.float64).ravel()
    if taus.size == 0:
        raise ValueError("thresholds is empty: give at least one threshold")
    if np.isnan(taus).any() or taus.min() < 0.0 or taus.max() > 1.0:
        raise ValueError(f"thresholds must lie in [0, 1], got {list(thresholds)}")
    mean_pred = _mean_probs(pr)
    mean_label = np.count_nonzero(y, axis=0) / y.shape[0]
    scores = [dice(mean_pred > t, mean_label > t) for t in taus]
    return float(np.mean(scores))


# --------------------------------------------------------------------------- surface distance


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim:
        raise ValueError(f"spacing must have one entry per axis ({ndim}), got {sp.size}")
    if not (np.isfinite(sp).all() and (sp > 0).all()):
        raise ValueError(f"spacing must be positive and finite, got {sp.tolist()}")
    return sp


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with at least one face-neighbour in the background (or off-image)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(
    a: npt.ArrayLike, b: npt.ArrayLike, spacing: float | Sequence[float] | None = None
) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries of two masks.

    The boundary of a mask is its foreground pixels that touch the background through a face
    (the image edge counts as background). For each boundary pixel of one mask the Euclidean
    distance to the nearest boundary pixel of the other is taken (in physical units when
    ``spacing`` is given); HD95 is the larger of the two directed 95th percentiles
    (``numpy.percentile``, linear interpolation), as in MONAI and DeepMind's surface-distance.

    Parameters
    ----------
    a, b
        Binary masks of the same shape (2D, 3D, ...).
    spacing
        Pixel size per axis (or one number for all axes); default 1.

    Returns
    -------
    float
        HD95; ``0.0`` when both masks are empty and ``nan`` when exactly one is empty
        (the distance is undefined then).
    """
    ma, mb = _pair(a, b)
    sp = _spacing(spacing, ma.ndim)
    has_a, has_b = ma.any(), mb.any()
    if not has_a and not has_b:
        return 0.0
    if not (has_a and has_b):
        return float("nan")
    ba, bb = _boundary(ma), _boundary(mb)
    d_ab = ndimage.distance_transform_edt(~bb, sampling=sp)[ba]
    d_ba = ndimage.distance_transform_edt(~ba, sampling=sp)[bb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
