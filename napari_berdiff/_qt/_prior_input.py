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
