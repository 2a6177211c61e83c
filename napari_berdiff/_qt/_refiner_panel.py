"""The Mask refiner's own panels: the refiner model (with its segmentor) and the prior."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import _model_panel, _notify
from ._layer_combo import LayerCombo
from ._layers import is_result_layer
from ._model_panel import ModelPanel
from ._prior_input import KEEP_LABEL, NEVER_LABEL

#: the "keep / never" entry that stands for no such layer
NO_MARKS = "none"
#: layer metadata key that marks a "keep / never" layer (never offered as the prior)
MARKS_ROLE = "napari_berdiff_keep_never"
#: the prior-source entry that stands for the segmentor's prediction
SOURCE_SEGMENTOR = "segmentor"
SEGMENTOR_TEXT = "Segmentor prediction"
DEFAULT_TRUST = 0.7
#: the bundled refiner loaded by default when it exists
DEFAULT_REFINER = "refiner-phantom-64"


def is_marks_layer(layer: Any) -> bool:
    """Whether ``layer`` is a "keep / never" constraints layer made by the panel."""
    return bool(getattr(layer, "metadata", {}).get(MARKS_ROLE))


# Engine calls, kept as module functions so that tests can replace them.
def _load_refiner(path: str, preset: str | None, device: str) -> tuple[Any, Any | None]:
    """``(refiner, segmentor or None)`` from a refiner file (``preset`` is not used)."""
    from ..refine import load_refiner

    return load_refiner(path, device=device)


def _bundled_refiners() -> list[Path]:
    """The bundled refiner files, the default one first."""
    found = [p for p in _model_panel._bundled_models()
             if _model_panel.bundled_file_kind(p) == "refiner"]
    return sorted(found, key=lambda p: (not p.name.startswith(DEFAULT_REFINER), p.name))


class RefinerModelPanel(ModelPanel):
    """Load a mask refiner; the segmentor its metadata names is loaded with it."""

    loader = staticmethod(lambda path, preset, device: _load_refiner(path, preset, device))

    def __init__(self, parent: QWidget | None = None):
        self.segmentor: Any = None
        super().__init__(parent, title="Refiner model")
        self.bundled.setToolTip("Mask refiners shipped with napari-berdiff")
        self.open_btn.setText("Open refiner…")
        self.open_btn.setToolTip(
            "A napari-berdiff refiner (.safetensors); the segmentor its metadata names is "
            "loaded with it when the file sits next to it"
        )

    def bundled_paths(self) -> list[Path]:
        return _bundled_refiners()

    def load_default(self) -> Any | None:
        """Load the first bundled refiner when no model is loaded yet; returns the worker."""
        path = self.bundled.currentData()
        if self.model is None and not self.loading and path:
            return self.load_path(path)
        return None

    def _loaded(self, result: Any, path: str) -> None:
        refiner, segmentor = result
        self.segmentor = segmentor
        super()._loaded(refiner, path)
        if segmentor is not None:
            _notify.info(f"Its segmentor ({segmentor.name}) is loaded too: choose "
                         f"'{SEGMENTOR_TEXT}' as the prior to refine its prediction.")

    def _load_failed(self, exc: BaseException, path: str, preset: str | None) -> None:
        # Official .pt files are never refiners: no preset to offer, just the reason.
        _notify.error(f"Could not load {Path(path).name} as a mask refiner: {exc}")
        try:
            self._show_model()
        except RuntimeError:
            pass

    def set_models(self, refiner: Any, segmentor: Any | None = None, label: str = "") -> None:
        """Use an already built refiner and (optionally) its segmentor."""
        self.segmentor = segmentor
        self.set_model(refiner, label)

    def _show_model(self) -> None:
        super()._show_model()
        if self.model is None:
            return
        seg = self.segmentor
        line = (f"Segmentor: <b>{html.escape(str(seg.name))}</b> (its prediction can be the "
                "prior)" if seg is not None
                else "No segmentor: refine a mask from a Labels layer.")
        self.summary.setText(f"{self.summary.text()}<br>{line}")

    def _device_changed(self, choice: str) -> None:
        if self.segmentor is not None and choice:
            try:
                self.segmentor.to(choice)
            except Exception:  # noqa: BLE001 - reported for the refiner just below
                pass
        super()._device_changed(choice)


class PriorPanel(QGroupBox):
    """The prior to refine (a Labels layer or the segmentor's prediction) and its trust."""

    def __init__(self, viewer: Any, parent: QWidget | None = None):
        super().__init__("Prior mask", parent)
        from napari.layers import Labels

        self.viewer = viewer
        self.source_combo = LayerCombo(
            viewer, (Labels,),
            accept=lambda lay: not is_result_layer(lay) and not is_marks_layer(lay))
        self.source_combo.setToolTip(
            "The mask to refine: any Labels layer (a mask you drew, accepted or edited; every "
            "non-zero label is the object) or the segmentor's prediction"
        )
        self.edit_btn = QPushButton("Edit with brush")
        self.edit_btn.setToolTip("Select the prior layer and switch to the paint brush")
        self.trust_spin = QDoubleSpinBox()
        self.trust_spin.setRange(0.0, 1.0)
        self.trust_spin.setSingleStep(0.05)
        self.trust_spin.setDecimals(2)
        self.trust_spin.setValue(DEFAULT_TRUST)
        self.trust_spin.setToolTip(
            "How far the mask's boundary is believed: 1 keeps it sharp (p is 0 or 1), lower "
            "values soften it so the refiner may move it further. A segmentor's prediction "
            "is already a probability map and is used as it is."
        )
        self.keep_edits_check = QCheckBox("Keep my edits")
        self.keep_edits_check.setChecked(True)
        self.keep_edits_check.setToolTip(
            "Pixels you painted or erased in the prior since the last accept keep your value "
            "in every refined mask (hard constraints)"
        )
        self.marks_combo = LayerCombo(viewer, (Labels,), specials=((NO_MARKS, "(none)"),),
                                      accept=lambda lay: not is_result_layer(lay),
                                      prefer_last=False)
        self.marks_combo.setToolTip(
            "Optional Labels layer of hard constraints: label 1 (keep) is foreground and label "
            "2 (never) is background in every refined mask"
        )
        self.marks_btn = QPushButton("New")
        self.marks_btn.setToolTip("Add a 'keep / never' Labels layer over the image and paint "
                                  "label 1 (keep) or 2 (never)")
        self.hint = QLabel("")
        self.hint.setWordWrap(True)

        src_row = QHBoxLayout()
        src_row.addWidget(self.source_combo, 1)
        src_row.addWidget(self.edit_btn)
        marks_row = QHBoxLayout()
        marks_row.addWidget(self.marks_combo, 1)
        marks_row.addWidget(self.marks_btn)
        form = QFormLayout()
        form.addRow("Prior:", src_row)
        form.addRow("Trust:", self.trust_spin)
        form.addRow("", self.keep_edits_check)
        form.addRow("Keep / never:", marks_row)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.hint)

        self.edit_btn.clicked.connect(self.edit_prior)
        self.marks_btn.clicked.connect(self.new_marks_layer)
        self.source_combo.layer_changed.connect(self._source_changed)
        self._source_changed()

    # ------------------------------------------------------------------ choices
    def layer(self) -> Any | None:
        """The chosen prior Labels layer (None for the segmentor or no choice)."""
        return self.source_combo.layer()

    def marks_layer(self) -> Any | None:
        """The chosen "keep / never" Labels layer, if any."""
        return self.marks_combo.layer()

    def keep_edits(self) -> bool:
        return self.keep_edits_check.isChecked()

    def new_marks_layer(self) -> Any | None:
        """Add an empty "keep / never" Labels layer the shape of the prior (or the first
        image), choose it, and make it active with the brush on label 1 (keep)."""
        from napari.layers import Image
        from napari.utils.colormaps import DirectLabelColormap

        ref = self.layer()
        if ref is None:
            ref = next((lay for lay in self.viewer.layers if isinstance(lay, Image)), None)
        if ref is None:
            return None
        shape = ref.data.shape[:-1] if getattr(ref, "rgb", False) else ref.data.shape
        colours = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                  KEEP_LABEL: "#009E73",      # bluish green
                                                  NEVER_LABEL: "#0072B2"})    # blue
        marks = self.viewer.add_labels(np.zeros(shape, np.uint8), name="keep / never",
                                       scale=ref.scale, translate=ref.translate, opacity=0.6,
                                       colormap=colours, metadata={MARKS_ROLE: True})
        self.marks_combo.set_layer(marks)
        self.viewer.layers.selection.active = marks
        marks.selected_label = 1
        marks.mode = "paint"
        return marks

    def uses_segmentor(self) -> bool:
        return self.source_combo.special() == SOURCE_SEGMENTOR

    def trust(self) -> float:
        return float(self.trust_spin.value())

    def set_segmentor_available(self, available: bool) -> None:
        """List (or drop) the 'Segmentor prediction' entry."""
        self.source_combo.set_specials(((SOURCE_SEGMENTOR, SEGMENTOR_TEXT),) if available
                                       else ())
        self._source_changed()

    def use_layer(self, layer: Any) -> None:
        self.source_combo.set_layer(layer)

    def use_segmentor(self) -> None:
        self.source_combo.set_special(SOURCE_SEGMENTOR)

    def _source_changed(self, *_: Any) -> None:
        try:
            has_layer = self.layer() is not None
            self.edit_btn.setEnabled(has_layer)
            empty = not (has_layer or self.uses_segmentor())
            self.hint.setText("No prior yet: draw a rough mask in a Labels layer (Layers ▸ "
                              "New Labels layer, then paint), or load a refiner with a "
                              "segmentor." if empty else "")
            self.hint.setVisible(empty)
        except RuntimeError:
            pass

    def edit_prior(self) -> Any | None:
        """Make the prior layer active with the paint brush; returns it."""
        layer = self.layer()
        if layer is None:
            return None
        layer.visible = True
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        return layer
