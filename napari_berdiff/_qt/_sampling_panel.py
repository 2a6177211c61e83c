"""The sampling panel: image, region, volume mode, settings, Sample and Cancel."""

from __future__ import annotations

import os
import random
from typing import Any

from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._inputs import MODE_SLICE, MODE_VOLUME
from ._layer_combo import LayerCombo
from ._layers import is_result_layer
from ._window_presets import WindowPresetCombo

#: shown (status and Sample button tooltip) until a model is loaded
NO_MODEL_HINT = "No model loaded yet: choose one above and press Load (or open a checkpoint)."
REGION_WHOLE = "whole"


class SamplingPanel(QGroupBox):
    def __init__(self, viewer: Any, parent: QWidget | None = None):
        super().__init__("Sampling", parent)
        from napari.layers import Image, Shapes

        self.viewer = viewer
        self.image_combo = LayerCombo(viewer, (Image,), accept=lambda lay: not is_result_layer(lay))
        self.image_combo.setToolTip("The image to segment")
        self.region_combo = LayerCombo(
            viewer, (Shapes,), specials=((REGION_WHOLE, "Whole image"),), prefer_last=False
        )
        self.region_combo.setToolTip(
            "A rectangle in a Shapes layer (its selected shape, else its last one), "
            "or the whole image when it is small enough"
        )
        self.draw_btn = QPushButton("Draw box")
        self.draw_btn.setToolTip("Add a Shapes layer 'region' in rectangle mode: drag a box")

        self.slice_radio = QRadioButton("Current slice")
        self.volume_radio = QRadioButton("All slices")
        self.slice_radio.setChecked(True)
        self._mode_group = QButtonGroup(self)
        self._mode_group.addButton(self.slice_radio)
        self._mode_group.addButton(self.volume_radio)
        self.volume_row = QWidget()
        vr = QHBoxLayout(self.volume_row)
        vr.setContentsMargins(0, 0, 0, 0)
        vr.addWidget(self.slice_radio)
        vr.addWidget(self.volume_radio)
        vr.addStretch(1)

        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 256)
        self.n_spin.setValue(16)
        self.n_spin.setToolTip("Number of samples drawn together")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setValue(10)
        self.steps_spin.setToolTip("Reverse steps visited (at most the model's chain length T)")
        self.temperature_spin = QDoubleSpinBox()
        self.temperature_spin.setRange(0.05, 1.0)
        self.temperature_spin.setSingleStep(0.05)
        self.temperature_spin.setDecimals(2)
        self.temperature_spin.setValue(1.0)
        self.temperature_spin.setToolTip(
            "Bernoulli models: each step draws from the predicted mask sharpened by "
            "1/temperature. 1 is BerDiff's plain step; lower keeps each sample nearer its most "
            "likely mask. Set to the model's own value when a model is loaded."
        )
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("The same seed gives the same samples")
        self.new_seed_btn = QPushButton("New seed")
        self.interval_spin = QSpinBox()
        self.interval_spin.setRange(0, 5000)
        self.interval_spin.setSingleStep(50)
        self.interval_spin.setValue(100)
        self.interval_spin.setSuffix(" ms")
        self.interval_spin.setToolTip(
            "Shortest time between two layer updates while streaming (0: every step). "
            "The first and the last step are always shown; where drawing a frame is slow, "
            "updates are spaced so that drawing takes at most a quarter of the run."
        )
        self.threads_combo = QComboBox()
        self.threads_combo.addItem("auto", "auto")
        for k in range(1, (os.cpu_count() or 1) + 1):
            self.threads_combo.addItem(str(k), k)
        self.threads_combo.setToolTip(
            "CPU threads for sampling. auto: the cores other programs leave free when the run "
            "starts (more threads than free cores slow sampling down several-fold)"
        )
        self._bernoulli = True  # until a model says otherwise
        self._shown_default = 1.0  # what the box showed for the model's own temperature
        self.keep_check = QCheckBox("Keep previous results")
        self.keep_check.setToolTip("Unticked: a new run replaces the previous run's layers")

        self.sample_btn = QPushButton("Sample")
        self.sample_btn.setStyleSheet("font-weight: bold")
        # Disabled until a model is there: loading one takes seconds and memory, so the
        # user chooses it (or the refiner's default is loaded); see set_model_defaults.
        self.has_model = False
        self.sample_btn.setEnabled(False)
        self.sample_btn.setToolTip(NO_MODEL_HINT)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.status = QLabel(NO_MODEL_HINT)
        self.status.setWordWrap(True)
        # A wrapped label in the scrolling dock is not given its wrapped height: keep room
        # for three lines (a finished run's summary with a presence estimate).
        self.status.setMinimumHeight(3 * self.status.fontMetrics().lineSpacing() + 8)

        region_row = QHBoxLayout()
        region_row.addWidget(self.region_combo, 1)
        region_row.addWidget(self.draw_btn)
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.seed_spin, 1)
        seed_row.addWidget(self.new_seed_btn)
        self.window_box = WindowPresetCombo(self.image_combo.layer)
        form = QFormLayout()
        form.addRow("Image:", self.image_combo)
        form.addRow("Display window:", self.window_box)
        form.addRow("Region:", region_row)
        self._volume_label = QLabel("Volume:")
        form.addRow(self._volume_label, self.volume_row)
        form.addRow("Samples:", self.n_spin)
        form.addRow("Steps:", self.steps_spin)
        form.addRow("Temperature:", self.temperature_spin)
        form.addRow("Seed:", seed_row)
        form.addRow("Stream every:", self.interval_spin)
        form.addRow("Threads:", self.threads_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.sample_btn, 2)
        buttons.addWidget(self.cancel_btn, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.keep_check)
        lay.addLayout(buttons)
        lay.addWidget(self.status)

        self.new_seed_btn.clicked.connect(self.new_seed)
        self.draw_btn.clicked.connect(self.draw_region)
        self.image_combo.layer_changed.connect(self._image_changed)
        self._image_changed()

    # ------------------------------------------------------------------ helpers
    def new_seed(self) -> int:
        seed = random.randrange(0, 2**31 - 1)
        self.seed_spin.setValue(seed)
        return seed

    def volume_mode(self) -> str:
        return MODE_VOLUME if self.volume_radio.isChecked() else MODE_SLICE

    def set_volume_mode(self, mode: str) -> None:
        (self.volume_radio if mode == MODE_VOLUME else self.slice_radio).setChecked(True)

    def show_volume_choice(self, visible: bool) -> None:
        """Show or hide the 'Current slice / All slices' row (hidden: current slice only)."""
        if not visible:
            self.set_volume_mode(MODE_SLICE)
        self.volume_row.setVisible(visible)
        self._volume_label.setVisible(visible)

    def region_layer(self) -> Any | None:
        return self.region_combo.layer()

    def _image_changed(self, *_: Any) -> None:
        layer = self.image_combo.layer()
        is_volume = (layer is not None and not getattr(layer, "rgb", False)
                     and layer.data.ndim == 3)
        try:
            self.volume_row.setEnabled(bool(is_volume))
            self._volume_label.setEnabled(bool(is_volume))
        except RuntimeError:
            pass

    def draw_region(self) -> Any:
        """Add (or reuse) a Shapes layer 'region' in rectangle mode and choose it as region."""
        from napari.layers import Shapes

        from . import _notify

        image = self.image_combo.layer()
        layer = next((lay for lay in self.viewer.layers
                      if isinstance(lay, Shapes) and lay.name == "region"), None)
        if layer is None:
            kw: dict[str, Any] = {}
            if image is not None:
                kw = {"scale": tuple(image.scale[-2:]), "translate": tuple(image.translate[-2:])}
            layer = self.viewer.add_shapes(
                name="region", ndim=2, edge_color="yellow", face_color="transparent",
                edge_width=1.5, **kw,
            )
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        self.region_combo.set_layer(layer)
        _notify.info("Drag a rectangle around the region of interest, then press "
                     f"{self.sample_btn.text()}.")
        return layer

    def set_running(self, running: bool) -> None:
        self.sample_btn.setEnabled(not running and self.has_model)
        for w in (self.image_combo, self.region_combo, self.draw_btn,
                  self.volume_row, self.n_spin, self.steps_spin, self.seed_spin,
                  self.new_seed_btn, self.keep_check):
            w.setEnabled(not running)
        self.temperature_spin.setEnabled(not running and self._bernoulli)
        self.cancel_btn.setEnabled(running)
        if not running:
            self._image_changed()

    def steps_spec(self, model: Any) -> int | str | None:
        """The visited steps to ask for: the model's own spacing (e.g. the official
        ``ddimuni10``) when the count is its default, else that many evenly spaced steps."""
        n = self.steps_spin.value()
        return None if n == model.diffusion.default_step_count else n

    def temperature(self, model: Any) -> float | None:
        """The temperature to ask for: None while the box still shows what it showed for the
        model's own value (rounded to its two decimals), or for a model that is not Bernoulli."""
        value = self.temperature_spin.value()
        if model.diffusion.kind != "bernoulli" or value == self._shown_default:
            return None
        return round(value, 2)

    def set_model_defaults(self, model: Any) -> None:
        cfg = model.diffusion
        if not self.has_model:
            self.has_model = True
            self.sample_btn.setEnabled(True)
            self.sample_btn.setToolTip("")
            if self.status.text() == NO_MODEL_HINT:
                self.status.setText("")
        few_step = cfg.kind == "cdal"  # cDAL takes exactly its T steps
        self.steps_spin.setRange(int(cfg.timesteps) if few_step else 1, int(cfg.timesteps))
        self.steps_spin.setValue(cfg.default_step_count)
        self.steps_spin.setToolTip(
            f"This cDAL model takes all of its {cfg.timesteps} steps" if few_step
            else "Reverse steps visited (at most the model's chain length T)")
        self._bernoulli = cfg.kind == "bernoulli"
        self.temperature_spin.setMinimum(min(0.05, cfg.temperature))
        self.temperature_spin.setMaximum(max(1.0, cfg.temperature))
        self.temperature_spin.setValue(cfg.temperature)
        self._shown_default = self.temperature_spin.value()
        self.temperature_spin.setEnabled(self._bernoulli)
