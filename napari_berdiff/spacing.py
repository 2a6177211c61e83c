"""Physical pixel spacing: sample at the model's spacing, map the results back (DESIGN §9).

A model knows the in-plane spacing (mm per pixel) it was trained at (``data.spacing``, or 64 mm
/ size for phantom models; :func:`napari_berdiff.distribution.model_spacing`). When an image's
spacing is known too, the region is resampled to the model's spacing (linear interpolation,
with anti-aliasing when shrinking), sampled there, and each sample's probabilities and masks
are resampled back to the image's grid, the masks by thresholding the resampled masks at 0.5
(probabilities first, then the threshold), as nnU-Net maps its predictions back.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

__all__ = ["spacing_of", "zoom_factor", "resample_image", "resample_back", "Resampling",
           "to_model_spacing", "map_back", "sample_at_spacing", "segment_at_spacing",
           "TOLERANCE"]

#: Spacings within this relative difference are treated as equal (no resampling).
TOLERANCE = 0.05


def spacing_of(value: Any) -> float | None:
    """One in-plane spacing (mm) from a number or a sequence (its last two values' mean)."""
    if value is None:
        return None
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 0 or not np.isfinite(arr).all() or (arr[-2:] <= 0).any():
        return None
    return float(arr[-2:].mean())


def zoom_factor(image_spacing: Any, model_spacing: Any) -> float | None:
    """How much to scale the image's pixel grid (None: no resampling needed or possible)."""
    a, b = spacing_of(image_spacing), spacing_of(model_spacing)
    if a is None or b is None or abs(a / b - 1) <= TOLERANCE:
        return None
    return a / b


def resample_image(image: np.ndarray, zoom: float) -> np.ndarray:
    """(C, H, W) image on a grid ``zoom`` times as fine (linear; anti-aliased when shrinking)."""
    from skimage.transform import resize

    img = np.asarray(image, dtype=np.float32)
    c, h, w = img.shape
    shape = (c, max(int(round(h * zoom)), 1), max(int(round(w * zoom)), 1))
    return resize(img, shape, order=1, mode="edge", anti_aliasing=zoom < 1,
                  preserve_range=True).astype(np.float32)


def resample_back(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N, h, w) float maps resampled (linearly) to (N, *shape)."""
    from skimage.transform import resize

    arr = np.asarray(maps, dtype=np.float32)
    return resize(arr, (arr.shape[0], *shape), order=1, mode="edge", anti_aliasing=False,
                  preserve_range=True).astype(np.float32)


def _crop(image: np.ndarray, roi: Any) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    from .diffusion.sampler import check_roi

    img = np.asarray(image)
    if img.ndim == 2:
        img = img[None]
    box = check_roi(roi, tuple(img.shape[1:]))
    y0, x0, y1, x1 = box
    return img[:, y0:y1, x0:x1], box


def _as_float(model: Any, img: np.ndarray) -> np.ndarray:
    """Integer images as the model's ``unit`` normalisation reads them, before resampling
    turns them into floats (other normalisations are unchanged by a constant scale)."""
    mode = (model.data.get("normalisation") or {}).get("mode", "minmax")
    if mode == "unit" and np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    return img


class Resampling:
    """What :func:`to_model_spacing` did, for :func:`map_back`."""

    def __init__(self, zoom: float, box: tuple[int, int, int, int], shape: tuple[int, int]):
        self.zoom, self.box, self.shape = zoom, box, shape


def to_model_spacing(model: Any, image: np.ndarray, image_spacing: Any, roi: Any = None,
                     prior: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, Resampling | None]:
    """The region of ``image`` (and of ``prior``) resampled to the model's spacing.

    Returns ``(image, prior, resampling)``; ``resampling`` is None (and the inputs are
    returned unchanged) when either spacing is unknown or they agree.
    """
    from .distribution import model_spacing

    zoom = zoom_factor(image_spacing, model_spacing(model.data))
    if zoom is None:
        return image, prior, None
    crop, box = _crop(image, roi)
    small = resample_image(_as_float(model, crop), zoom)
    how = Resampling(zoom, box, crop.shape[1:])
    if prior is not None:
        prior = to_model_grid(prior, how, small.shape[1:]).clip(0, 1)
    return small, prior, how


def to_model_grid(values: np.ndarray, how: Resampling, shape: tuple[int, int]) -> np.ndarray:
    """An (H, W) map of the image (a prior, a constraint indicator) cut to the resampled
    region and resampled (linearly) onto the model's ``shape``."""
    y0, x0, y1, x1 = how.box
    part = np.asarray(values, dtype=np.float32)[y0:y1, x0:x1]
    return resample_back(part[None], shape)[0]


def constraints_to_model_grid(constraints: np.ndarray, how: Resampling,
                              shape: tuple[int, int]) -> np.ndarray | None:
    """A constraint map (−1 free, 0 never, 1 keep) of the image on the model's grid: a pixel
    is kept (or never) where more than half of it was."""
    from .refine import constraint_map

    keep, never = (to_model_grid(constraints == v, how, shape) > 0.5 for v in (1, 0))
    return constraint_map(shape, keep, never)


def map_back(result: Any, how: Resampling | None) -> Any:
    """A :class:`SampleResult` on the resampled grid, mapped back to the image's region:
    probabilities resampled, masks resampled then thresholded at 0.5."""
    if how is None:
        return result
    if result.probs is None:
        return replace(result, roi=how.box)
    tic = time.perf_counter()
    probs = resample_back(result.probs, how.shape).clip(0, 1)
    masks = (resample_back(result.masks.astype(np.float32), how.shape) > 0.5)
    timings = dict(result.timings)
    timings["resample_s"] = time.perf_counter() - tic
    timings["zoom"] = how.zoom
    return replace(result, probs=probs, masks=masks.astype(result.masks.dtype), roi=how.box,
                   timings=timings)


def sample_at_spacing(model: Any, image: np.ndarray, image_spacing: Any, n: int = 16,
                      steps: int | str | None = None, seed: int = 0, *, roi: Any = None,
                      **kwargs: Any) -> Any:
    """:meth:`DiffusionModel.sample_all` at the model's spacing, mapped back to the image.

    With the image's or the model's spacing unknown, or equal, this is ``sample_all``. The
    result's ``roi`` is the region of the original image; ``timings["zoom"]`` says how much
    the region was scaled.
    """
    small, prior, how = to_model_spacing(model, image, image_spacing, roi,
                                         kwargs.pop("prior", None))
    if prior is not None:
        kwargs["prior"] = prior
    if how is None:
        return model.sample_all(image, n, steps, seed, roi=roi, **kwargs)
    return map_back(model.sample_all(small, n, steps, seed, **kwargs), how)


def segment_at_spacing(model: Any, image: np.ndarray, image_spacing: Any) -> np.ndarray:
    """A segmentor's probability map at the model's spacing, resampled back to the image."""
    from .distribution import model_spacing

    zoom = zoom_factor(image_spacing, model_spacing(model.data))
    if zoom is None:
        return model.segment(image)
    img = np.asarray(image)
    img = img[None] if img.ndim == 2 else img
    prob = model.segment(resample_image(_as_float(model, img), zoom))
    return resample_back(prob[None], img.shape[1:])[0].clip(0, 1)
