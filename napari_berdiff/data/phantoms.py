"""CT-like phantoms with several simulated annotators (DESIGN §7).

There is no public medical data set that installs offline, so the engine ships this generator.
Each phantom is a crop centred near a lesion, like the LIDC-IDRI crops BerDiff uses:

* a textured background: smooth parenchyma-like intensity variations, fine correlated
  texture, a few bright vessel-like curves and acquisition noise;
* a lesion: a star-shaped blob whose *soft* map ``soft`` (0 outside, 1 inside) falls off over
  a blurred boundary of a few pixels, added to the background with a contrast that varies
  from clear to faint;
* K annotators, each of whom thresholds the soft lesion at their own level (annotator 0 draws
  the loosest contour, annotator K-1 the tightest), with a smooth boundary jitter of their own,
  and who, when the lesion is faint, sometimes miss it and mark nothing (at least one
  annotator always marks it, as in LIDC where a crop exists only because a reader marked it).

Everything is deterministic by seed. The *oracle* for the true mask distribution samples the
annotators uniformly (:func:`oracle_samples`); it gives the best GED² / HM-IoU achievable with
N samples against the K annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Phantom", "make_phantom", "make_phantoms", "oracle_samples", "annotate",
           "DEFAULT_THRESHOLDS", "FAINT_CONTRAST"]

#: Thresholds on the soft lesion of the annotators for K = 4, loosest first.
DEFAULT_THRESHOLDS = (0.25, 0.4, 0.55, 0.7)
#: A lesion whose contrast is below this is "faint": annotators may miss it.
FAINT_CONTRAST = 0.16
#: Probability that one annotator misses a faint lesion.
MISS_PROBABILITY = 0.4


@dataclass
class Phantom:
    """One phantom case.

    Attributes
    ----------
    image
        (H, W) float32 in [0, 1].
    masks
        (K, H, W) uint8 annotator masks (0/1); a missed lesion is an empty mask.
    soft
        (H, W) float32 in [0, 1]: the soft lesion the annotators threshold.
    info
        ``seed``, ``contrast``, ``faint``, ``thresholds`` (per annotator), ``missed``
        (per annotator), ``radius``, ``boundary_width``, ``centre``.
    """

    image: np.ndarray
    masks: np.ndarray
    soft: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_annotators(self) -> int:
        return int(self.masks.shape[0])


def _thresholds(k: int) -> np.ndarray:
    if k == len(DEFAULT_THRESHOLDS):
        return np.asarray(DEFAULT_THRESHOLDS, dtype=np.float64)
    if k == 1:
        return np.asarray([0.5])
    return np.linspace(DEFAULT_THRESHOLDS[0], DEFAULT_THRESHOLDS[-1], k)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-12)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    shape = (size, size)
    s = size / 128.0
    level = rng.uniform(0.22, 0.38)
    bg = (level + 0.06 * _smooth_noise(rng, shape, 14 * s)
          + 0.025 * _smooth_noise(rng, shape, 2.0 * s))
    # Vessel-like bright curves: smooth random walks drawn as thin blurred lines.
    vessels = np.zeros(shape)
    for _ in range(rng.integers(2, 6)):
        n = 200
        pos = rng.uniform(0, size, 2)
        ang = rng.uniform(0, 2 * np.pi)
        turn = ndi.gaussian_filter1d(rng.standard_normal(n), 10) * 0.12
        step = size / n * 1.2
        pts = []
        for i in range(n):
            ang += turn[i]
            pos = pos + step * np.array([np.sin(ang), np.cos(ang)])
            pts.append(pos.copy())
        pts = np.round(np.asarray(pts)).astype(int)
        ok = (pts >= 0).all(1) & (pts < size).all(1)
        line = np.zeros(shape)
        line[pts[ok, 0], pts[ok, 1]] = 1.0
        width = rng.uniform(0.6, 1.6) * s
        line = ndi.gaussian_filter(line, width)
        vessels += rng.uniform(0.08, 0.25) * line / (line.max() + 1e-12)
    # An occasional bright chest-wall-like region entering from one side.
    if rng.random() < 0.3:
        yy, xx = np.mgrid[0:size, 0:size] / size
        ang = rng.uniform(0, 2 * np.pi)
        d = (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang)
        edge = 1.0 / (1.0 + np.exp(-(d - rng.uniform(0.3, 0.45)) * size / (2.0 * s)))
        bg += rng.uniform(0.2, 0.4) * edge
    return bg + vessels


def _lesion(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A star-shaped lesion with a blurred boundary; returns (soft, info)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-size / 12, size / 12, 2)
    radius = rng.uniform(0.06, 0.19) * size
    width = rng.uniform(1.2, 3.0) * size / 128.0
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    r_theta = np.ones_like(theta)
    for h in range(2, 6):
        amp = rng.uniform(0, 0.18 / h ** 0.7)
        r_theta += amp * np.cos(h * theta + rng.uniform(0, 2 * np.pi))
    stretch = rng.uniform(0.75, 1.0)
    ang = rng.uniform(0, np.pi)
    r_theta *= radius / np.sqrt(
        (np.cos(theta - ang) ** 2) / 1.0 + (np.sin(theta - ang) ** 2) / stretch ** 2
    ) * np.sqrt(stretch)
    soft = 1.0 / (1.0 + np.exp(-(r_theta - dist) / width))
    info = {"centre": [float(cy), float(cx)], "radius": float(radius),
            "boundary_width": float(width)}
    return soft, info


def annotate(soft: np.ndarray, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """One annotator's contour: the soft lesion plus a smooth jitter, thresholded.

    The jitter moves the boundary by about a pixel, smoothly along it. The mask is cleaned
    to its largest connected component with holes filled, as a human contour would be.
    """
    size = soft.shape[0]
    jitter = 0.07 * _smooth_noise(rng, soft.shape, 3.0 * size / 128.0)
    m = (soft + jitter) > threshold
    lab, n = ndi.label(m)
    if n > 1:
        sizes = ndi.sum(m, lab, index=np.arange(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    return ndi.binary_fill_holes(m).astype(np.uint8)


def make_phantom(seed: int, size: int = 128, n_annotators: int = 4) -> Phantom:
    """Generate the phantom for ``seed`` (deterministic; different seeds differ).

    Parameters
    ----------
    seed
        Any non-negative integer.
    size
        Height and width in pixels (the texture and lesion scale with it).
    n_annotators
        K, the number of simulated annotators.
    """
    if int(size) < 16:
        raise ValueError(f"a phantom must be at least 16 pixels wide, got size={size}")
    if int(n_annotators) < 1:
        raise ValueError(f"n_annotators must be >= 1, got {n_annotators}")
    size, k = int(size), int(n_annotators)
    rng = np.random.default_rng([int(seed), 4242])
    bg = _background(rng, size)
    soft, info = _lesion(rng, size)
    # Contrast: mostly clear lesions, about a quarter faint ones.
    contrast = float(rng.uniform(0.07, FAINT_CONTRAST) if rng.random() < 0.25
                     else rng.uniform(FAINT_CONTRAST, 0.5))
    texture = 1.0 + 0.15 * _smooth_noise(rng, (size, size), 2.5 * size / 128.0)
    img = bg + contrast * soft * texture
    img = img + rng.normal(0, 0.02, img.shape)
    image = np.clip(img, 0.0, 1.0).astype(np.float32)

    faint = contrast < FAINT_CONTRAST
    thresholds = _thresholds(k) + rng.uniform(-0.04, 0.04, k)
    masks = np.stack([annotate(soft, float(t), rng) for t in thresholds])
    missed = np.zeros(k, dtype=bool)
    if faint and k > 1:
        missed = rng.random(k) < MISS_PROBABILITY
        if missed.all():
            missed[rng.integers(k)] = False
    masks[missed] = 0
    info.update({
        "seed": int(seed), "size": size, "contrast": contrast, "faint": bool(faint),
        "thresholds": [float(t) for t in thresholds], "missed": [bool(m) for m in missed],
    })
    return Phantom(image=image, masks=masks, soft=soft.astype(np.float32), info=info)


def make_phantoms(seeds, size: int = 128, n_annotators: int = 4) -> list[Phantom]:
    """:func:`make_phantom` for each seed."""
    return [make_phantom(int(s), size, n_annotators) for s in seeds]


def oracle_samples(phantom_or_seed: Phantom | int, n: int,
                   rng: np.random.Generator | int | None = None, *,
                   fresh: bool = False) -> np.ndarray:
    """``n`` samples from the true mask distribution: annotators drawn uniformly.

    This is the oracle of DESIGN §7: the annotators are drawn uniformly with replacement.

    * ``fresh=False`` (default): the phantom's own K annotations are resampled. This is the
      best any method can score against those K annotations with N samples.
    * ``fresh=True``: each sample is a *new* annotation from the generative process (an
      annotator drawn uniformly, a new threshold perturbation and boundary jitter, a new miss
      draw for faint lesions). This is what a perfect model of the mask distribution would
      produce, since the jitter of the K reference annotations cannot be predicted from the
      image; it is the realistic ceiling for a trained model.

    Parameters
    ----------
    phantom_or_seed
        A :class:`Phantom`, or a seed for :func:`make_phantom` with its defaults.
    n
        Number of samples.
    rng
        A numpy Generator, or a seed for one.

    Returns
    -------
    np.ndarray
        (n, H, W) uint8.
    """
    ph = make_phantom(int(phantom_or_seed)) if not isinstance(phantom_or_seed, Phantom) \
        else phantom_or_seed
    if int(n) < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    k = ph.masks.shape[0]
    idx = rng.integers(0, k, int(n))
    if not fresh:
        return ph.masks[idx].astype(np.uint8)
    base = _thresholds(k)
    faint = bool(ph.info.get("faint", False))
    out = np.zeros((int(n), *ph.masks.shape[1:]), np.uint8)
    for j, a in enumerate(idx):
        t = float(base[a] + rng.uniform(-0.04, 0.04))
        m = annotate(ph.soft, t, rng)
        if not (faint and k > 1 and rng.random() < MISS_PROBABILITY):
            out[j] = m
    return out
