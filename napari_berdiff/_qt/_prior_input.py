"""The refiner's prior map for a prepared run: from a Labels layer or a segmentor (no Qt).

Everything is checked on the main thread before a run starts; a bad prior raises
:class:`~._inputs.InputProblem` with a message for the user, and nothing starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._inputs import MODE_SLICE, InputProblem, Placement, PreparedInput


def _roi_slices(placement: Placement) -> tuple[slice, slice]:
    y0, x0, y1, x1 = placement.roi
    return slice(y0, y1), slice(x0, x1)


def prior_from_layer(layer: Any, placement: Placement, trust: float) -> np.ndarray:
    """The prior map p over the run's region from a mask layer (any non-zero label is the
    object): the mask of the image's slice, softened with ``trust``, cut to the region.

    Raises
    ------
    InputProblem
        For a layer whose shape does not match the image, or a mask that is empty (in the
        image or in the region).
    """
    from ..refine import prior_map

    data = np.asarray(layer.data)
    spatial = tuple(placement.spatial_shape)
    if placement.mode == MODE_SLICE and data.shape == spatial:
        data = data[placement.z]
    hw = spatial[-2:]
    try:
        p = prior_map(data, hw, trust)
    except ValueError as exc:
        raise InputProblem(f"Cannot refine the prior '{layer.name}': {exc}.") from None
    region = _roi_slices(placement)
    if not (data[region] > 0).any():
        raise InputProblem(
            f"Cannot refine the prior '{layer.name}': it is empty inside the region "
            f"({placement.describe()}). Draw the mask there, or choose another region."
        )
    return np.ascontiguousarray(p[region], dtype=np.float32)


def _plane_region(data: np.ndarray, placement: Placement) -> np.ndarray:
    """The run's slice (when ``data`` is a volume of the image's shape) cut to its region."""
    if placement.mode == MODE_SLICE and data.shape == tuple(placement.spatial_shape):
        data = data[placement.z]
    return data[_roi_slices(placement)]


#: label values of a "keep / never" Labels layer
KEEP_LABEL, NEVER_LABEL = 1, 2


def constraints_for_run(prior: Any | None, baseline: np.ndarray | None, marks: Any | None,
                        placement: Placement) -> np.ndarray | None:
    """The hard constraints over the run's region (−1 free, 0 never, 1 keep), or None.

    - Edits: where the prior layer now differs from ``baseline`` (its contents at the last
      accept), a painted pixel must stay foreground and an erased one background.
    - Marks: a "keep / never" Labels layer's label 1 pixels stay foreground and its label 2
      pixels background (they win over edits).

    Raises
    ------
    InputProblem
        For a marks layer of another shape than the image.
    """
    from ..refine import constraint_map

    keep = never = None
    if prior is not None and baseline is not None:
        cur = np.asarray(prior.data)
        if cur.shape == baseline.shape:
            now = _plane_region(cur, placement) > 0
            before = _plane_region(baseline, placement) > 0
            keep, never = now & ~before, ~now & before
    if marks is not None:
        data = np.asarray(marks.data)
        if data.shape not in (tuple(placement.spatial_shape),
                              tuple(placement.spatial_shape[-2:])):
            raise InputProblem(
                f"The keep / never layer '{marks.name}' has shape {data.shape}, not the "
                f"image's {tuple(placement.spatial_shape)}: make it over the same image.")
        region = _plane_region(data, placement)
        k, nv = region == KEEP_LABEL, region == NEVER_LABEL
        keep = k if keep is None else (keep & ~nv) | k
        never = nv if never is None else (never & ~k) | nv
    if keep is None:
        return None
    return constraint_map(keep.shape, keep, never)


def prior_from_segmentor(segmentor: Any, crop: np.ndarray, trust: float
                         ) -> tuple[np.ndarray, list[str]]:
    """The segmentor's probability map of ``crop`` (C, h, w) as the prior, with warnings."""
    from ..refine import prior_map

    try:
        prob = np.asarray(segmentor.segment(crop), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - reported to the user
        raise InputProblem(f"The segmentor could not predict a prior: {exc}") from None
    try:
        p = prior_map(prob, crop.shape[-2:], trust)
    except ValueError as exc:
        raise InputProblem(f"Cannot refine the segmentor's prediction: {exc}.") from None
    warnings = []
    if float(p.max()) < 0.5:
        warnings.append(
            f"The segmentor finds no object in the region (its highest probability is "
            f"{float(p.max()):.2f}): the refined masks will likely be empty. Draw a rough "
            "mask in a Labels layer and refine that instead."
        )
    return np.ascontiguousarray(p, dtype=np.float32), warnings


def attach_prior(prepared: PreparedInput, layer: Any | None, segmentor: Any | None,
                 trust: float) -> PreparedInput:
    """Set ``prepared.priors`` from the prior layer, else from the segmentor.

    Raises :class:`InputProblem` when there is neither, or the prior is unusable.
    """
    if len(prepared.crops) != 1:  # the widget refines one slice at a time
        raise InputProblem("The mask refiner refines one slice at a time.")
    if layer is not None:
        prepared.priors = [prior_from_layer(layer, prepared.placement, trust)]
    elif segmentor is not None:
        p, warnings = prior_from_segmentor(segmentor, prepared.crops[0], trust)
        prepared.priors = [p]
        prepared.warnings.extend(warnings)
    else:
        raise InputProblem(
            "There is no prior mask to refine. Draw a rough mask in a Labels layer (Layers ▸ "
            "New Labels layer, then paint) and choose it under Prior, or load a refiner that "
            "comes with a segmentor."
        )
    return prepared
