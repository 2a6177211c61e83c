"""The "Mask refiner" dock widget: refine a mask with a HiDiff-style Bernoulli refiner.

It is the sampling widget (:class:`~._widget.DiffusionSegmentationWidget`) with a refiner
model panel, a prior panel and a refine-in-place accept: the refined samples stream into
the same layers (Refined samples, mean probability, frequency, variance, entropy), browse and accept
the same way, and cancel and closing the viewer behave the same. The loop never leaves
napari: refine → accept into the prior layer (one undo step) → edit it with the brush →
refine again. "Undo accept" restores the mask from before the last accept.

Threading is the sampling widget's: the prior is checked and computed on the main thread
before the run starts, the reverse process runs in a worker, and layers change only in
the worker's callbacks. Torch is imported lazily.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QPushButton, QWidget

from . import _notify
from ._accept import check_target
from ._inputs import MODE_SLICE, InputProblem, PreparedInput, prepare_input
from ._layers import REFINED_SAMPLES, RunLayers
from ._metrics_panel import MetricsPanel
from ._prior_input import attach_prior, constraints_for_run
from ._refiner_panel import PriorPanel, RefinerModelPanel
from ._results_panel import TARGET_NEW, ResultsPanel
from ._sampling_panel import SamplingPanel
from ._widget import DiffusionSegmentationWidget

#: the target entry that writes the accepted mask back into the run's prior layer
TARGET_PRIOR = "prior"
#: how many accepts "Undo accept" can take back
UNDO_DEPTH = 10


def _load_default_later(panel: RefinerModelPanel) -> Any:
    """A callback loading the default bundled refiner, holding the panel weakly."""
    ref = weakref.ref(panel)

    def load() -> None:
        p = ref()
        try:
            if p is not None:
                p.load_default()
        except RuntimeError:  # the panel's Qt side is gone
            pass

    return load


class MaskRefinerWidget(DiffusionSegmentationWidget):
    """Refine a prior mask (a Labels layer or a segmentor's prediction) into N samples,
    browse them, accept one into the mask, edit it, refine again, undo."""

    run_name = "Refining"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(napari_viewer, parent)
        #: (layer, region, previous contents of the region) for each accept, newest last
        self._undo: deque[tuple[Any, tuple[slice, ...], np.ndarray]] = deque(
            maxlen=UNDO_DEPTH)
        self._pending_prior: Any = None
        self.run_prior: Any = None  # the prior Labels layer of the last run (None: segmentor)
        #: each prior layer's contents at its last accept (or first refine): the pixels that
        #: differ from it since are the user's edits, kept as hard constraints
        self._baselines: dict[int, tuple[Any, np.ndarray]] = {}
        self.undo_btn.clicked.connect(self.undo_accept)
        QTimer.singleShot(0, _load_default_later(self.model_panel))

    def _create_panels(self, viewer: Any) -> list[QWidget]:
        self.model_panel = RefinerModelPanel()
        self.prior = PriorPanel(viewer)
        sp = self.sampling = SamplingPanel(viewer)
        sp.setTitle("Refine")
        sp.image_combo.setToolTip("The image the prior mask outlines")
        sp.sample_btn.setText("Refine")
        sp.sample_btn.setToolTip("Draw N refined masks of the prior")
        sp.n_spin.setValue(8)
        sp.n_spin.setToolTip("Number of refined masks drawn together")
        sp.show_volume_choice(False)
        self.results = ResultsPanel(viewer)
        self.results.target_combo.set_specials((
            (TARGET_PRIOR, "Prior layer (in place)"),
            (TARGET_NEW, "New labels layer 'accepted'"),
        ))
        self.results.target_combo.set_special(TARGET_PRIOR)
        self.results.target_combo.setToolTip(
            "Where the accepted mask goes: back into the prior layer (one undo step, "
            "Ctrl+Z) or a new layer"
        )
        self.undo_btn = QPushButton("Undo accept")
        self.undo_btn.setToolTip("Put back the mask as it was before the last accept "
                                 "(the same as Ctrl+Z on that layer)")
        self.undo_btn.setEnabled(False)
        self.results.layout().addWidget(self.undo_btn)
        self.metrics = MetricsPanel(viewer)
        return [self.model_panel, self.prior, self.sampling, self.results, self.metrics]

    # ------------------------------------------------------------------ model
    @property
    def segmentor(self) -> Any:
        return self.model_panel.segmentor

    def set_model(self, model: Any, label: str = "", segmentor: Any | None = None) -> None:
        """Use an already built refiner and, optionally, its segmentor."""
        self.model_panel.set_models(model, segmentor, label)

    def samples_layer_name(self) -> str:
        return REFINED_SAMPLES

    def _model_changed(self, model: Any) -> None:
        super()._model_changed(model)
        self.prior.set_segmentor_available(self.segmentor is not None)

    # ------------------------------------------------------------------ refining
    def _prepare(self) -> PreparedInput:
        sp = self.sampling
        prepared = prepare_input(self.viewer, self.model, sp.image_combo.layer(),
                                 sp.region_layer(), MODE_SLICE, refiner=True)
        layer = self.prior.layer()
        seg = self.segmentor if self.prior.uses_segmentor() else None
        attach_prior(prepared, layer, seg, self.prior.trust())
        baseline = self._baseline(layer) if self.prior.keep_edits() else None
        fixed = constraints_for_run(layer if baseline is not None else None, baseline,
                                    self.prior.marks_layer(), prepared.placement)
        prepared.constraints = None if fixed is None else [fixed]
        if layer is not None and hash(layer) not in self._baselines:
            self._set_baseline(layer)  # edits from now on are the user's
        self._pending_prior = layer
        return prepared

    def _baseline(self, layer: Any) -> np.ndarray | None:
        entry = self._baselines.get(hash(layer)) if layer is not None else None
        return entry[1] if entry is not None and entry[0] is layer else None

    def _set_baseline(self, layer: Any) -> None:
        self._baselines[hash(layer)] = (layer, np.array(layer.data, copy=True))

    def sample(self, *_: Any) -> Any:
        """Start refining with the panels' settings; returns the worker, or None (after a
        notification) when the input or the prior is unusable."""
        self._pending_prior = None
        worker = super().sample()
        if worker is not None:
            self.run_prior = self._pending_prior
            self.prior.setEnabled(False)
        return worker

    refine = sample

    def _finish_ui(self, active: Any, outcome: Any) -> None:
        super()._finish_ui(active, outcome)
        self.prior.setEnabled(True)

    # ------------------------------------------------------------------ accept
    def _resolve_target(self, run: RunLayers) -> Any:
        combo = self.results.target_combo
        if combo.special() != TARGET_PRIOR:
            return super()._resolve_target(run)
        prior = self.run_prior
        if prior is not None and prior in self.viewer.layers:
            check_target(prior, run.placement)
            return prior
        if prior is not None:
            raise InputProblem(f"The prior layer '{prior.name}' was removed. Choose another "
                               "target, or 'New labels layer'.")
        # refined from the segmentor: the first accept makes the mask to edit
        target = self.target_layer(create=True)
        combo.set_special(TARGET_PRIOR)
        return target

    def _before_write(self, target: Any, run: RunLayers) -> None:
        region = run.placement.region
        self._undo.append((target, region, np.array(target.data[region], copy=True)))

    def _write(self, run: RunLayers, mask: np.ndarray, what: str) -> Any | None:
        target = super()._write(run, mask, what)
        if target is not None:
            # the next refine starts from what was just accepted; edits count from here
            self.prior.use_layer(target)
            self.run_prior = target
            self._set_baseline(target)
        self._update_undo()
        return target

    def _update_undo(self) -> None:
        while self._undo and self._undo[-1][0] not in self.viewer.layers:
            self._undo.pop()
        self.undo_btn.setEnabled(bool(self._undo))

    def undo_accept(self, *_: Any) -> Any | None:
        """Restore the mask from before the last accept (one undoable edit); returns its
        layer, or None when there is nothing to undo."""
        self._update_undo()
        if not self._undo:
            _notify.info("Nothing to undo: no accept yet.")
            return None
        layer, region, old = self._undo.pop()
        cur = np.asarray(layer.data[region])
        changed = np.nonzero(cur != old)
        if changed[0].size:
            offset = [s.start for s in region]
            values = old[changed]
            with layer.block_history():
                for v in np.unique(values):
                    sel = values == v
                    index = tuple(ix[sel] + o for ix, o in zip(changed, offset))
                    layer.data_setitem(index, int(v))
        self._update_undo()
        self._set_baseline(layer)
        _notify.info(f"Restored '{layer.name}' as it was before the last accept.")
        return layer
