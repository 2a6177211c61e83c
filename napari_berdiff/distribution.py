"""Is an image like the ones a model was trained on? (DESIGN §9, out-of-distribution notice.)

At training time a model records, in its metadata ``data.intensity_stats``, how its
*normalised* training images look. Each image is described by :data:`FEATURES`: five
intensity percentiles (what a modality and a window change) and four texture measures (the
mean absolute gradient per pixel, and how much of the gradient and of the variance survives
a Gaussian blur of 1 and 2 pixels: what the pixel scale and the noise change). The mean and
the covariance of these over the training images are stored, with a limit: 1.25 times the
99th percentile of the training images' own Mahalanobis distances, and at least
:data:`MIN_LIMIT`.

At sampling time the region to be sampled, normalised as the model does, is described the
same way. When its Mahalanobis distance exceeds the limit, :func:`check_input` returns a
plain sentence naming the features furthest from training: sampling still runs, but the
results are unlikely to be meaningful. A known pixel spacing more than a factor
:data:`SPACING_RATIO` away from the model's is reported too.

Bundled phantom models predate the statistics: for a model trained on
:mod:`napari_berdiff.data.phantoms`, they are derived from the generator at its size when
the model is loaded (:func:`model_intensity_stats`), and its spacing is 64 mm / size.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["FEATURES", "MIN_LIMIT", "SPACING_RATIO", "image_features", "intensity_stats",
           "model_intensity_stats", "model_spacing", "check_input", "input_distance"]

_PERCENTILES = (5, 25, 50, 75, 95)
#: What :func:`image_features` measures, in order.
FEATURES = tuple(f"{p}th percentile" for p in _PERCENTILES) + (
    "mean gradient", "gradient kept by a 2-pixel blur", "variance kept by a 1-pixel blur",
    "variance kept by a 2-pixel blur")
_N_INTENSITY = len(_PERCENTILES)
#: The smallest limit on the Mahalanobis distance.
MIN_LIMIT = 6.0
#: A known spacing this many times finer or coarser than the model's is reported.
SPACING_RATIO = 1.5
#: Phantoms are a 64 mm field of view (DESIGN §9).
PHANTOM_FOV_MM = 64.0


def _grad(img: np.ndarray) -> float:
    gy = np.abs(np.diff(img, axis=-2)).mean() if img.shape[-2] > 1 else 0.0
    gx = np.abs(np.diff(img, axis=-1)).mean() if img.shape[-1] > 1 else 0.0
    return float(gy + gx) / 2


def image_features(image: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` of one normalised (C,) H, W image (channels pooled)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[None]
    q = np.percentile(img, _PERCENTILES)
    g = _grad(img)
    sd = img.std()
    s1 = np.stack([ndi.gaussian_filter(c, 1.0) for c in img])
    s2 = np.stack([ndi.gaussian_filter(c, 2.0) for c in img])
    ratio = (lambda a, b: a / b if b > 1e-12 else 1.0)
    return np.concatenate([q, [g, ratio(_grad(s2), g), ratio(s1.std(), sd),
                               ratio(s2.std(), sd)]])


def intensity_stats(images: np.ndarray | list[np.ndarray]) -> dict[str, Any]:
    """The statistics to record at training time, from the normalised training images
    ((N, C, H, W) or a list of (C,) H, W arrays; a few hundred are plenty)."""
    feats = np.stack([image_features(im) for im in images])
    mean = feats.mean(0)
    cov = np.cov(feats.T) if feats.shape[0] > 1 else np.zeros((feats.shape[1],) * 2)
    stats = {"features": list(FEATURES), "mean": mean.tolist(), "cov": cov.tolist(),
             "n_images": int(feats.shape[0])}
    d = np.array([_mahalanobis(f, stats) for f in feats])
    stats["limit"] = round(max(MIN_LIMIT, 1.25 * float(np.percentile(d, 99))), 3)
    return stats


def _mahalanobis(f: np.ndarray, stats: dict[str, Any]) -> float:
    mean = np.asarray(stats["mean"], dtype=np.float64)
    cov = np.asarray(stats["cov"], dtype=np.float64)
    # a small ridge keeps a near-constant feature from dominating
    cov = cov + np.diag(np.maximum(np.diag(cov) * 0.05, 1e-6))
    diff = f - mean
    return float(np.sqrt(max(diff @ np.linalg.solve(cov, diff), 0.0)))


def input_distance(data: dict[str, Any], normalised: np.ndarray) -> tuple[float, float] | None:
    """(Mahalanobis distance, limit) of a normalised region from a model's training images,
    or None when the model's statistics are unknown."""
    stats = model_intensity_stats(data)
    if stats is None:
        return None
    return _mahalanobis(image_features(normalised), stats), float(stats["limit"])


def _phantom_trained(data: dict[str, Any]) -> bool:
    ds = data.get("dataset") or {}
    text = " ".join(str(v) for v in (data.get("description", ""), ds.get("description", ""),
                                     ds.get("generator", ""), ds.get("layout", "")))
    return "phantom" in text


#: Phantom statistics derived once (``python -m napari_berdiff.distribution``), keyed by size;
#: a test checks that they equal a fresh derivation.
PHANTOM_STATS_FILE = Path(__file__).with_name("data") / "phantom_stats.json"
_PHANTOM_SEEDS = range(10_000, 10_096)


def derive_phantom_stats(size: int) -> dict[str, Any]:
    """The statistics of the phantom generator's images at ``size`` (96 phantoms)."""
    from .data.phantoms import make_phantom
    from .model import normalise_image

    return intensity_stats([normalise_image(make_phantom(s, size).image[None],
                                            {"mode": "minmax"}) for s in _PHANTOM_SEEDS])


@lru_cache(maxsize=8)
def _phantom_stats(size: int) -> dict[str, Any]:
    try:
        stored = json.loads(PHANTOM_STATS_FILE.read_text())
    except (OSError, ValueError):
        stored = {}
    if str(size) in stored:
        return stored[str(size)]
    return derive_phantom_stats(size)


def model_intensity_stats(data: dict[str, Any]) -> dict[str, Any] | None:
    """A model's training statistics: stored, derived for phantom models, else None."""
    stats = data.get("intensity_stats")
    if isinstance(stats, dict) and "mean" in stats and "cov" in stats:
        return stats
    mode = (data.get("normalisation") or {}).get("mode", "minmax")
    if _phantom_trained(data) and mode == "minmax" and data.get("image_size"):
        return _phantom_stats(int(data["image_size"]))
    return None


def model_spacing(data: dict[str, Any]) -> float | None:
    """The in-plane pixel spacing (mm) a model was trained at, when known."""
    sp = data.get("spacing") or (data.get("dataset") or {}).get("spacing")
    if sp:
        return float(np.mean(np.atleast_1d(np.asarray(sp, dtype=float))[-2:]))
    if _phantom_trained(data) and data.get("image_size"):
        return PHANTOM_FOV_MM / float(data["image_size"])
    return None


def check_input(data: dict[str, Any], normalised: np.ndarray,
                spacing: float | tuple[float, ...] | None = None) -> str | None:
    """A sentence saying why results are unlikely to be meaningful, or None.

    Parameters
    ----------
    data
        The model's ``metadata["data"]``.
    normalised
        The region to be sampled, normalised as the model does ((C,) H, W).
    spacing
        The image's in-plane pixel spacing in mm, when known.
    """
    reasons: list[str] = []
    stats = model_intensity_stats(data)
    if stats is not None:
        f = image_features(normalised)
        dist, limit = _mahalanobis(f, stats), float(stats["limit"])
        if dist > limit:
            mean = np.asarray(stats["mean"])
            sd = np.sqrt(np.maximum(np.diag(np.asarray(stats["cov"])), 1e-12))
            z = (f - mean) / sd
            worst = [i for i in np.argsort(-np.abs(z))[:2] if abs(z[i]) > 2]
            what = "intensities" if all(i < _N_INTENSITY for i in worst) else (
                "texture" if all(i >= _N_INTENSITY for i in worst) else "intensities and texture")
            detail = ", ".join(f"{FEATURES[i]} {f[i]:.3g} (training {mean[i]:.3g} ± {sd[i]:.2g})"
                               for i in worst)
            reasons.append(f"its {what} after normalisation differ from the training images' "
                           f"(distance {dist:.1f}, limit {limit:.1f}"
                           + (f": {detail}" if detail else "") + "), as another modality, "
                           "window or pixel scale would")
    ms = model_spacing(data)
    if spacing is not None and ms is not None:
        sp = float(np.mean(np.atleast_1d(np.asarray(spacing, dtype=float))[-2:]))
        if sp > 0 and max(sp / ms, ms / sp) > SPACING_RATIO:
            reasons.append(f"its pixel spacing is {sp:.3g} mm while the model was trained at "
                           f"{ms:.3g} mm")
    if not reasons:
        return None
    return ("This image looks unlike the model's training data, so its results are unlikely "
            "to be meaningful: " + "; ".join(reasons) + ".")


if __name__ == "__main__":  # rewrite the stored phantom statistics
    doc = {str(n): derive_phantom_stats(n) for n in (64, 128)}
    PHANTOM_STATS_FILE.write_text(json.dumps(doc, indent=1) + "\n")
    print(PHANTOM_STATS_FILE)
