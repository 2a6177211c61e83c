"""A combo box of display windows (lung, mediastinum, bone, brain) for a CT image layer.

It sets the chosen image layer's contrast limits only: what is sampled never depends on
them (a model with a recorded window applies its own, see :mod:`..windowing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QComboBox, QWidget

NO_PRESET = "—"


class WindowPresetCombo(QComboBox):
    """Display presets for the layer that ``layer()`` returns (contrast limits only)."""

    def __init__(self, layer: Callable[[], Any], parent: QWidget | None = None):
        super().__init__(parent)
        from ..windowing import WINDOW_PRESETS

        self._layer = layer
        self.addItem(NO_PRESET)
        for name, (width, level) in WINDOW_PRESETS.items():
            self.addItem(name)
            self.setItemData(self.count() - 1, f"W{width:g} / L{level:g} HU", 3)  # tooltip
        self.setToolTip("Display window for a CT image in HU (the display only: sampling "
                        "uses the model's own window or normalisation)")
        self.currentTextChanged.connect(self.apply)
        self.textActivated.connect(self.apply)  # choosing the shown preset again re-applies it

    def apply(self, name: str | None = None) -> bool:
        """Set the image layer's contrast limits to the preset; False if nothing changed."""
        from ..windowing import WINDOW_PRESETS, window_limits

        name = name or self.currentText()
        layer = self._layer()
        if name not in WINDOW_PRESETS or layer is None:
            return False
        lo, hi = window_limits(*WINDOW_PRESETS[name])
        layer.contrast_limits_range = (min(lo, layer.contrast_limits_range[0]),
                                       max(hi, layer.contrast_limits_range[1]))
        layer.contrast_limits = (lo, hi)
        return True
