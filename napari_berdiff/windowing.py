"""Intensity windows: the one a model was trained in, and display presets (no Qt, no napari).

A model's card may record the window its training images were cut to, in
``metadata["data"]["window"] = {"units": "HU", "width": W, "level": L}``. When the image to
sample is in those units (a CT series read from DICOM is in Hounsfield units), sampling maps
``[L − W/2, L + W/2]`` to ``[0, 1]`` (clipping outside) instead of the model's usual
normalisation, whatever contrast limits the layer shows. A model without a window keeps its
normalisation; LIDC-style models (the LIDC preset, or a card whose data description names
LIDC) default to the lung window, W1500/L−600.

The display presets only change what the viewer shows, never what is sampled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

HU = "HU"
#: the lung window the LIDC crops are cut to
LUNG_WINDOW = {"units": HU, "width": 1500.0, "level": -600.0}
#: display presets: name -> (width, level) in HU
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}


def window_limits(width: float, level: float) -> tuple[float, float]:
    """``(lower, upper)`` of a window given its width and level (centre)."""
    return (float(level) - float(width) / 2.0, float(level) + float(width) / 2.0)


def model_window(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The intensity window a model's metadata records, or the lung window for an
    LIDC-style model that records none; None otherwise."""
    meta = metadata or {}
    data = meta.get("data") or {}
    window = data.get("window")
    if isinstance(window, Mapping):
        return {"units": str(window.get("units", HU)), "width": float(window["width"]),
                "level": float(window["level"])}
    names = " ".join(str(x) for x in (meta.get("name"), meta.get("preset"),
                                        data.get("description")) if x)
    if "lidc" in names.lower():
        return dict(LUNG_WINDOW)
    return None


def apply_window(image: np.ndarray, window: Mapping[str, Any]) -> np.ndarray:
    """``image`` clipped to the window and scaled to [0, 1], as float32."""
    lo, hi = window_limits(window["width"], window["level"])
    img = np.asarray(image, dtype=np.float32)
    return ((np.clip(img, lo, hi) - lo) / np.float32(hi - lo)).astype(np.float32)


def layer_units(metadata: Mapping[str, Any] | None) -> str | None:
    """The intensity units an image layer's metadata declares ("HU" for CT from DICOM)."""
    meta = metadata or {}
    dicom = meta.get("dicom")
    units = (dicom or {}).get("units") if isinstance(dicom, Mapping) else meta.get("units")
    return str(units) if units else None
