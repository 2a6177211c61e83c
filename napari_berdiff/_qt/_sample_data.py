"""Sample data: a CT-like phantom lesion with the masks of K simulated annotators, and a
semi-real lung nodule (rendered CT around four radiologists' real LIDC-IDRI contours)."""

from __future__ import annotations

from typing import Any

LayerData = tuple[Any, dict[str, Any], str]


def phantom_sample(seed: int = 3, size: int = 128, n_annotators: int = 4) -> list[LayerData]:
    """The phantom image and a reference Labels layer with the K annotations on axis 0.

    Annotator ``k``'s mask holds the label ``k + 1``, so the annotators keep distinct
    colours; anything non-zero counts as foreground for the metrics.
    """
    import numpy as np

    from ..data.phantoms import make_phantom

    ph = make_phantom(seed, size=size, n_annotators=n_annotators)
    k = ph.masks.shape[0]
    labels = (ph.masks > 0).astype(np.uint8) * np.arange(1, k + 1, dtype=np.uint8)[:, None, None]
    info = {key: val for key, val in ph.info.items()
            if isinstance(val, (int, float, str, bool, list, tuple))}
    return [
        (ph.image, {"name": "phantom", "colormap": "gray", "contrast_limits": (0.0, 1.0),
                    "metadata": {"phantom": info}}, "image"),
        (labels, {"name": "annotators", "opacity": 0.4,
                  "metadata": {"annotators": k, "phantom": info}}, "labels"),
    ]


def lidc_nodule_sample(seed: int = 0) -> list[LayerData]:
    """A semi-real lung nodule: CT *rendered* around a test-split nodule of LIDC-IDRI, with
    its four radiologists' *real* contours as the reference (readers on axis 0, reader ``k``
    as label ``k + 1``). The central 128×128 of the 0.5 mm crop, scaled in mm, so that the
    widget resamples it to the model's spacing. See :func:`napari_berdiff.data.lidc.demo_slice`
    for how the nodule is chosen."""
    import numpy as np

    from ..data.layout import center_crop
    from ..data.lidc import LIDC_SPACING_MM, demo_slice
    from ..data.lidc_render import render_slice

    item = demo_slice()
    image = center_crop(render_slice(item, seed=seed)["image"], 128)
    masks = center_crop(item.masks, 128)
    k = masks.shape[0]
    labels = (masks > 0).astype(np.uint8) * np.arange(1, k + 1, dtype=np.uint8)[:, None, None]
    sp = (LIDC_SPACING_MM, LIDC_SPACING_MM)
    info = {**item.info(), "image": "rendered (napari_berdiff.data.lidc_render)",
            "contours": "real (LIDC-IDRI readers, CC BY 3.0)", "spacing_mm": list(sp)}
    return [
        (image, {"name": "nodule CT (rendered)", "colormap": "gray",
                 "contrast_limits": (0.0, 1.0), "scale": sp,
                 "metadata": {"lidc": info}}, "image"),
        (labels, {"name": "LIDC readers", "opacity": 0.4, "scale": (1.0, *sp),
                  "metadata": {"annotators": k, "lidc": info}}, "labels"),
    ]
