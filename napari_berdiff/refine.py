"""Refining a prior mask with a HiDiff-style Bernoulli refiner (DESIGN §3.2).

The refiner is conditioned on ``(image, p)`` (and, for a network with a ``segmentor``, on
that segmentor's multi-scale features, which depend on the image alone), so any mask can be
refined: one a person drew or edited (turned into p with
:func:`~napari_berdiff.priors.mask_to_prior`) or a segmentor's probability map. A refiner file may name its segmentor in its metadata
(``metadata["refiner"]["segmentor"]``, a file name in the same folder).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .diffusion import SampleResult, SampleStream, run_to_end
from .model import DiffusionModel
from .priors import mask_to_prior, validate_prior

__all__ = ["prior_map", "constraint_map", "constrain_prior", "enforce_constraints", "refine",
           "refine_all",
           "segmentor_path", "load_refiner"]


def prior_map(prior: np.ndarray, shape: tuple[int, int], trust: float = 0.7) -> np.ndarray:
    """The prior probability map p for ``prior``: a binary mask (softened with ``trust``)
    or a probability map (used as it is). Clear errors for a wrong shape or an empty prior."""
    p = validate_prior(prior, shape)
    binary = bool(np.isin(p, (0.0, 1.0)).all())
    return mask_to_prior(p, trust) if binary else p


def constraint_map(shape: tuple[int, int], keep: np.ndarray | None = None,
                   never: np.ndarray | None = None) -> np.ndarray | None:
    """Hard constraints as one (H, W) int8 map: 1 where ``keep`` is set (the pixel stays
    foreground in every sample), 0 where ``never`` is set (it stays background), −1 where
    the pixel is free. None when neither mask marks a pixel.

    Raises
    ------
    ValueError
        For a mask of another shape, or a pixel marked both keep and never.
    """
    out = np.full(shape, -1, dtype=np.int8)
    masks = {}
    for name, m in (("keep", keep), ("never", never)):
        if m is None:
            continue
        arr = np.asarray(m)
        if arr.shape != tuple(shape):
            raise ValueError(f"the {name} mask has shape {tuple(arr.shape)} but the image is "
                             f"{tuple(shape)}")
        masks[name] = arr != 0
    if "keep" in masks and "never" in masks:
        both = masks["keep"] & masks["never"]
        if both.any():
            ys, xs = np.nonzero(both)
            raise ValueError(f"{int(both.sum())} pixel(s) are marked both keep and never "
                             f"(first at row {ys[0]}, column {xs[0]}); clear one of them")
    if "keep" in masks:
        out[masks["keep"]] = 1
    if "never" in masks:
        out[masks["never"]] = 0
    return out if (out >= 0).any() else None


def constrain_prior(p: np.ndarray, constraints: np.ndarray | None) -> np.ndarray:
    """The prior map p with the constrained pixels set to their value (1 keep, 0 never)."""
    if constraints is None:
        return p
    return np.where(constraints >= 0, constraints, p).astype(np.float32)


def enforce_constraints(result: SampleResult, constraints: np.ndarray | None) -> SampleResult:
    """``result`` with its masks and probabilities set to the constraints' values inside its
    region (``result.roi``). The sampler already holds them on its own grid; this keeps them
    exactly after a result was resampled back to the image's grid."""
    if constraints is None or result.masks is None:
        return result
    y0, x0, y1, x1 = result.roi
    c = constraints[y0:y1, x0:x1]
    fixed = c >= 0
    masks, probs = result.masks.copy(), result.probs.copy()
    masks[:, fixed] = c[fixed].astype(masks.dtype)
    probs[:, fixed] = c[fixed].astype(probs.dtype)
    return replace(result, masks=masks, probs=probs)


def _check_refiner(refiner: DiffusionModel) -> None:
    if refiner.kind != "refiner":
        raise ValueError(f"this is a {refiner.kind} model, not a mask refiner; load a refiner "
                         "(for example models/refiner-phantom-64.safetensors)")


def refine(refiner: DiffusionModel, image: np.ndarray, prior: np.ndarray, *,
           trust: float = 0.7, n: int = 8, steps: int | str | None = None, seed: int = 0,
           keep: np.ndarray | None = None, never: np.ndarray | None = None,
           **sample_kwargs: Any) -> SampleStream:
    """Stream ``n`` refined masks of ``prior`` for ``image`` (see ``DiffusionModel.sample``
    for ``roi``, ``cancel`` and the other keyword arguments).

    ``keep`` and ``never`` are optional (H, W) masks of hard constraints: their non-zero
    pixels are foreground (``keep``) or background (``never``) in every refined sample and
    frame. The prior map p and ``x_t`` are clamped there at every step."""
    _check_refiner(refiner)
    img = np.asarray(image)
    constraints = constraint_map(img.shape[-2:], keep, never)
    p = constrain_prior(prior_map(prior, img.shape[-2:], trust), constraints)
    return refiner.sample(img, n, steps, seed, prior=p, constraints=constraints,
                          **sample_kwargs)


def refine_all(refiner: DiffusionModel, image: np.ndarray, prior: np.ndarray,
               **kwargs: Any) -> SampleResult:
    """:func:`refine` run to the end."""
    return run_to_end(refine(refiner, image, prior, **kwargs))


def segmentor_path(refiner: DiffusionModel, refiner_file: str | Path) -> Path | None:
    """The segmentor file a refiner's metadata names, if it exists next to the refiner."""
    name = refiner.metadata.get("refiner", {}).get("segmentor")
    if not name:
        return None
    path = Path(refiner_file).resolve().parent / Path(str(name)).name
    return path if path.exists() else None


def load_refiner(path: str | Path, device: str | None = "auto"
                 ) -> tuple[DiffusionModel, DiffusionModel | None]:
    """A refiner and, when its metadata names one that exists, its segmentor."""
    from .checkpoints import load_model

    refiner = load_model(path, device=device)
    _check_refiner(refiner)
    seg_file = segmentor_path(refiner, path)
    segmentor = load_model(seg_file, device=device) if seg_file is not None else None
    return refiner, segmentor
