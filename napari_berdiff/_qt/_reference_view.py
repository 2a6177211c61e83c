"""The reference annotators as layers of their own, so that they stay visible on every sample.

A reference with annotators on a leading axis, ``(K, …)``, shares napari's leftmost slider
with the samples ``(N, …)``: on sample ``i`` napari shows annotator ``i``, and none from sample
``K`` on. :func:`lay_out_reference` shows it instead as K outline layers with the image's
spatial axes only (no sample axis), each in a colour-blind-safe colour that differs from
the samples' (:data:`~._layers.SAMPLE_COLOR`). The stack itself is hidden, not changed: it
stays the reference the metrics use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._layers import META_KEY, REFERENCE_COLORS, axis_labels, batched_layer_changes, label_colormap

ROLE = "reference"


def reader_layers(viewer: Any, reference: Any) -> list[Any]:
    """The per-annotator layers already laid out for ``reference``, in annotator order."""
    found = [lay for lay in viewer.layers
             if (getattr(lay, "metadata", {}).get(META_KEY) or {}).get("role") == ROLE
             and lay.metadata[META_KEY].get("source") == reference.name]
    return sorted(found, key=lambda lay: lay.metadata[META_KEY]["reader"])


def reader_layer_name(reference: Any, k: int) -> str:
    """Readers are numbered from 0, as the widget numbers samples and their readers."""
    return f"{reference.name}: reader {k}"


def lay_out_reference(viewer: Any, reference: Any) -> list[Any]:
    """Show the ``(K, …)`` stack ``reference`` as K outline layers without the sample axis;
    returns them (the existing ones when already laid out with the same data). The stack is
    hidden when its layers are made."""
    from napari.layers import Labels

    data = np.asarray(reference.data)
    masks = data > 0
    existing = reader_layers(viewer, reference)
    if len(existing) == len(masks) and all(
            np.array_equal(lay.data > 0, m) for lay, m in zip(existing, masks)):
        return existing  # (a stack the user shows again stays shown)
    scale, translate = tuple(reference.scale[1:]), tuple(reference.translate[1:])
    made = []
    with batched_layer_changes(viewer):
        for lay in existing:
            viewer.layers.remove(lay)
        index = viewer.layers.index(reference) + 1
        for k, mask in enumerate(masks):
            layer = Labels(mask.astype(np.uint8), name=reader_layer_name(reference, k),
                           scale=scale, translate=translate, opacity=0.9,
                           colormap=label_colormap(REFERENCE_COLORS[k % len(REFERENCE_COLORS)]),
                           axis_labels=axis_labels(mask.ndim, False),
                           metadata={META_KEY: {"role": ROLE, "source": reference.name,
                                                "reader": k}})
            layer.contour = 1
            viewer.layers.insert(index + k, layer)
            made.append(layer)
        reference.visible = False
    return made
