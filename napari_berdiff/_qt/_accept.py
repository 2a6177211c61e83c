"""Writing an accepted mask into a target Labels layer as one undoable edit, and metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._inputs import InputProblem, Placement


def new_target_data(placement: Placement) -> np.ndarray:
    return np.zeros(placement.spatial_shape, dtype=np.uint8)


def check_target(target: Any, placement: Placement) -> None:
    shape = tuple(target.data.shape)
    if shape != tuple(placement.spatial_shape):
        raise InputProblem(
            f"The target layer '{target.name}' has shape {shape}, but the sampled image's is "
            f"{tuple(placement.spatial_shape)}. Choose another target or 'New labels layer'."
        )


def write_mask(target: Any, placement: Placement, mask: np.ndarray, label: int | None = None
               ) -> int:
    """Write ``mask`` (the results' shape) into ``target`` at the run's place; undoable.

    Pixels of the mask get ``label`` (the target's selected label by default); pixels of the
    region that held ``label`` but are outside the mask go back to 0, so accepting another
    sample replaces the previous choice there. Other labels outside the mask are left
    alone. Both writes go
    through ``Labels.data_setitem`` inside ``block_history()``: one undo step.
    Returns the number of pixels changed.
    """
    check_target(target, placement)
    if label is None:
        label = int(target.selected_label) or 1
    region = placement.region
    sub = np.asarray(target.data[region])
    mask = np.asarray(mask).astype(bool).reshape(sub.shape)
    offset = [s.start for s in region]
    fg = np.nonzero(mask & (sub != label))
    clear = np.nonzero(~mask & (sub == label))
    changed = int(fg[0].size + clear[0].size)
    if not changed:
        return 0
    fg = tuple(ix + o for ix, o in zip(fg, offset))
    clear = tuple(ix + o for ix, o in zip(clear, offset))
    with target.block_history():
        if fg[0].size:
            target.data_setitem(fg, label)
        if clear[0].size:
            target.data_setitem(clear, 0)
    return changed


def reference_stack(reference: Any, placement: Placement) -> np.ndarray:
    """The reference annotations over the run's footprint, as a (K, …) boolean stack.

    The reference has the image's spatial shape (one annotation) or a leading annotator
    axis (K annotations).
    """
    data = reference.data
    shape = tuple(data.shape)
    spatial = tuple(placement.spatial_shape)
    if shape == spatial:
        return (np.asarray(data[placement.region]) > 0)[None]
    if len(shape) == len(spatial) + 1 and shape[1:] == spatial:
        return np.asarray(data[(slice(None), *placement.region)]) > 0
    raise InputProblem(
        f"The reference layer '{reference.name}' has shape {shape}; it should match the "
        f"sampled image {spatial}, optionally with annotators on a leading axis (K, …)."
    )


def sample_metrics(samples: np.ndarray, refs: np.ndarray) -> dict[str, Any]:
    """Per-sample IoU against K references (best and mean), plus GED² and HM-IoU when K > 1."""
    from ..uncertainty import ged2, hm_iou, pairwise_iou

    s = samples > 0
    pw = pairwise_iou(s, refs)  # (N, K)
    out: dict[str, Any] = {"k": refs.shape[0], "best": pw.max(1), "mean": pw.mean(1)}
    if refs.shape[0] > 1:
        out["ged2"] = ged2(s, refs)
        out["hm_iou"] = hm_iou(s, refs)
    return out
