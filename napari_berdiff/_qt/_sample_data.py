"""Sample data: a CT-like phantom lesion with the masks of K simulated annotators."""

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
