"""The "Diffusion segmentation" dock widget: it wires the panels to a streaming run.

Threading contract (DESIGN §6): the reverse process runs in a napari ``create_worker``
generator (:func:`._run.run_job`); layers and widgets change only in that worker's
``yielded`` / ``returned`` / ``errored`` / ``finished`` callbacks, which napari delivers on
the main thread. Torch is imported lazily, never at this module's import.
"""

from __future__ import annotations

import html
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QFrame, QMainWindow, QScrollArea, QVBoxLayout, QWidget

from . import _notify
from ._accept import check_target, new_target_data, reference_stack, sample_metrics, write_mask
from ._inputs import InputProblem, PreparedInput, prepare_input
from ._layers import (
    CDAL_SAMPLES,
    GAUSSIAN_SAMPLES,
    OUTLINE_OPACITY,
    SAMPLES,
    RunLayers,
    batched_layer_changes,
)
from ._metrics_panel import MetricsPanel
from ._model_panel import ModelPanel
from ._preload import preload
from ._provenance import record_accept, run_provenance
from ._presentation import PresentPanel, ask_animation_path, export_animation, headline
from ._presentation import open_presentation as _open_presentation
from ._reader_preference import prefer_our_readers
from ._reference_view import lay_out_reference
from ._results_panel import KEY_ACCEPT, KEY_NEXT, KEY_PREV, TARGET_META, ResultsPanel
from ..animation import ReverseRecorder
from ._run import MAX_BUSY, Job, Outcome, Update, run_job
from ._sampling_panel import SamplingPanel
from ._status import done_text


@dataclass
class _Active:
    layers: RunLayers
    job: Job
    worker: Any = None
    pbar: Any = None
    outcome: Outcome | None = None
    error: BaseException | None = None
    last: Update | None = None
    done: bool = False
    finish_pending: bool = False
    unlike: str | None = None


class _CloseWatcher(QObject):
    """Tells the widget when napari's main window closes (the viewer is going away).

    It holds no Python reference to the window, so it cannot keep a closed viewer alive.
    """

    def __init__(self, window: QMainWindow, callback: Any):
        super().__init__(window)
        self._callback = callback
        window.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Close and isinstance(obj, QMainWindow):
            if not obj.isVisible():
                self._callback()
            else:  # a visible window may still refuse to close (confirmation dialog)
                win = weakref.ref(obj)
                QTimer.singleShot(0, lambda: self._check(win))
        return False

    def _check(self, win: Any) -> None:
        w = win()
        try:
            if w is None or not w.isVisible():
                self._callback()
        except RuntimeError:
            self._callback()


def _weak_handler(widget: Any, method: str) -> Any:
    """A key handler that does not keep the widget (and through it the viewer) alive."""
    ref = weakref.ref(widget)

    def handler(*_: Any) -> None:
        w = ref()
        if w is not None:
            try:
                getattr(w, method)()
            except RuntimeError:  # the widget's Qt side is gone
                pass

    handler.__name__ = f"napari_berdiff_{method}"
    return handler


def _set_event(holder: dict, *_: Any) -> None:
    ev = holder.get("cancel")
    if ev is not None:
        ev.set()


class DiffusionSegmentationWidget(QWidget):
    """Load a model, stream samples into layers, browse, accept, compare."""

    #: emitted after a streamed frame reached the layers (argument: the :class:`Update`)
    frame_pushed = Signal(object)
    #: emitted when a run ends, however it ends (argument: its :class:`Outcome` or None)
    run_finished = Signal(object)

    #: what a run is called in progress bars and messages
    run_name = "Sampling"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        panels = self._create_panels(napari_viewer)
        self.last_run: RunLayers | None = None
        self.kept_runs: list[RunLayers] = []
        self.last_metrics: dict[str, Any] | None = None
        self._active: _Active | None = None
        self._run_id = 0
        self._holder: dict[str, Any] = {"cancel": None}
        self._closed = False
        self._watcher: _CloseWatcher | None = None
        self._in_yield = 0
        #: the largest share of a run the main thread may spend showing frames (Job.max_busy)
        self.stream_max_busy = MAX_BUSY
        self._empty_armed: tuple[int, str] | None = None  # an empty accept awaiting a 2nd press
        self.preloading = preload()  # the first run's imports, off the main thread
        prefer_our_readers()  # NIfTI opens with our reader, without napari's dialog

        self.present = PresentPanel()
        panels.append(self.present)
        self.last_image: Any = None  # the image layer of the last run
        self.last_outcome: Outcome | None = None
        self.last_recorder: ReverseRecorder | None = None
        self.presentation: Any = None  # the last presentation viewer opened

        inner = QWidget()
        col = QVBoxLayout(inner)
        col.setContentsMargins(4, 4, 4, 4)
        for panel in panels:
            col.addWidget(panel)
        col.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        inner.setMinimumWidth(inner.minimumSizeHint().width())
        self.setMinimumWidth(max(360, inner.minimumSizeHint().width() + 20))

        self.model_panel.model_changed.connect(self._model_changed)
        self.model_panel.loading_changed.connect(
            lambda busy: self.sampling.sample_btn.setEnabled(
                not busy and self._active is None and self.model is not None)
        )
        self.sampling.sample_btn.clicked.connect(self.sample)
        self.sampling.cancel_btn.clicked.connect(self.cancel)
        self.results.prev_btn.clicked.connect(lambda: self.step_sample(-1))
        self.results.next_btn.clicked.connect(lambda: self.step_sample(+1))
        self.results.accept_btn.clicked.connect(self.accept)
        self.results.consensus_btn.clicked.connect(self.accept_consensus)
        self.metrics.ref_combo.layer_changed.connect(lambda *_: self.compute_metrics(quiet=True))
        self.metrics.table.cellClicked.connect(lambda row, _col: self.show_sample(row))
        self.present.present_btn.clicked.connect(self.open_presentation)
        self.present.export_btn.clicked.connect(self.export_animation)
        napari_viewer.dims.events.point.connect(self._dims_changed)
        self.destroyed.connect(lambda *_, h=self._holder: _set_event(h))
        self._keys = {KEY_NEXT: _weak_handler(self, "next_sample"),
                      KEY_PREV: _weak_handler(self, "previous_sample"),
                      KEY_ACCEPT: _weak_handler(self, "accept")}
        for key, func in self._keys.items():
            napari_viewer.bind_key(key, func, overwrite=True)

    def _create_panels(self, viewer: Any) -> list[QWidget]:
        """Build ``model_panel``, ``sampling``, ``results`` and ``metrics``; returns the
        panels in their order in the dock (subclasses add their own)."""
        self.model_panel = ModelPanel()
        self.sampling = SamplingPanel(viewer)
        self.results = ResultsPanel(viewer)
        self.metrics = MetricsPanel(viewer)
        return [self.model_panel, self.sampling, self.results, self.metrics]

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> Any:
        return self.model_panel.model

    def set_model(self, model: Any, label: str = "") -> None:
        """Use an already built model (what loading a checkpoint ends with)."""
        self.model_panel.set_model(model, label)

    def samples_layer_name(self) -> str:
        """The samples layer's name, after the kind of run that makes it."""
        kind = getattr(getattr(self.model, "diffusion", None), "kind", "bernoulli")
        return {"gaussian": GAUSSIAN_SAMPLES, "cdal": CDAL_SAMPLES}.get(kind, SAMPLES)

    def _model_changed(self, model: Any) -> None:
        if model is not None:
            self.sampling.set_model_defaults(model)

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self._active is not None and not self._active.done

    @property
    def worker(self) -> Any:
        return self._active.worker if self._active is not None else None

    def _viewer_alive(self) -> bool:
        return not self._closed

    def _watch_window(self) -> None:
        """Watch the main window we are docked in, so that closing it cancels a run."""
        if self._watcher is not None:
            return
        w = self.parentWidget()
        while w is not None and not isinstance(w, QMainWindow):
            w = w.parentWidget()
        if w is not None:
            self._watcher = _CloseWatcher(w, self._window_closed)

    def _window_closed(self) -> None:
        self._closed = True
        _set_event(self._holder)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _layer_spacing(prepared: Any) -> tuple[float, ...] | None:
        """The image layer's in-plane scale as a pixel spacing in mm; None when it is
        napari's default (1, 1), which says nothing about the physical size."""
        scale = tuple(float(v) for v in tuple(prepared.placement.scale)[-2:])
        return None if not scale or all(v == 1.0 for v in scale) else scale

    def _unlike_training(self, prepared: Any, spacing: Any) -> str | None:
        """Warn (and return the notice) when the first crop looks unlike the model's
        training data; sampling still runs."""
        if not prepared.crops or self.model is None:
            return None
        from ..spacing import to_model_spacing

        crop, _, how = to_model_spacing(self.model, prepared.crops[0], spacing)
        notice = self.model.input_notice(crop, spacing=None if how else spacing)
        if notice:
            _notify.warning(notice + " Sampling anyway.")
        return notice

    def _spacing_text(self, spacing: Any) -> str:
        """A short status note on how the pixel spacing is handled ('' when nothing to say)."""
        from ..distribution import model_spacing
        from ..spacing import spacing_of, zoom_factor

        ms = model_spacing(self.model.data)
        if ms is None:
            return ""
        if spacing is None:
            return f"<br>Pixel spacing unknown (layer scale 1): taken as the model's {ms:.3g} mm."
        if zoom_factor(spacing, ms) is not None:
            return (f"<br>Resampled from {spacing_of(spacing):.3g} mm to the model's "
                    f"{ms:.3g} mm pixels and back.")
        return ""

    def sample(self, *_: Any) -> Any:
        """Start a run with the panel's settings; returns its worker, or None on bad input."""
        if self.running:
            _notify.info("A run is already in progress: wait for it or press Cancel.")
            return None
        sp = self.sampling
        try:
            prepared = self._prepare()
        except InputProblem as exc:
            _notify.error(str(exc))
            return None
        for text in prepared.warnings:
            _notify.warning(text)
        spacing = self._layer_spacing(prepared)
        unlike = self._unlike_training(prepared, spacing)

        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._run_id += 1
        n = sp.n_spin.value()
        layers = RunLayers(self.viewer, prepared.placement, n, self._run_id,
                           self.model_panel.model_label, self.model.n_readers,
                           samples_name=self.samples_layer_name())
        layers.geometry = prepared.geometry
        layers.provenance = run_provenance(self.model, sp.seed_spin.value(),
                                           sp.steps_spin.value(), sp.steps_spec(self.model),
                                           sp.temperature(self.model))
        previous = self.last_run
        keep = previous is not None and sp.keep_check.isChecked()
        if previous is None or keep or not layers.take_over(previous):
            # Batched: a scene-graph update (with a full garbage collection) runs once, not
            # once per layer; a take-over changes no layer and needs none.
            with batched_layer_changes(self.viewer):
                if keep:
                    previous.keep()
                    self.kept_runs.append(previous)
                elif previous is not None:
                    previous.remove()
                layers.add()
        self._bind_layer_keys(layers)
        self.last_run = layers
        self.last_image = sp.image_combo.layer()
        self.last_recorder = ReverseRecorder()
        self.last_outcome = None
        self.last_metrics = None
        self.metrics.clear()
        job = Job(self.model, prepared.crops, prepared.seed_offsets, n, sp.steps_spec(self.model),
                  sp.seed_spin.value(), interval_s=sp.interval_spin.value() / 1000.0,
                  priors=prepared.priors, temperature=sp.temperature(self.model),
                  recorder=self.last_recorder, spacing=spacing,
                  max_busy=self.stream_max_busy)
        job.units = prepared.units  # CT in HU: the model's window applies
        job.constraints = prepared.constraints  # the refiner's keep / never pixels
        job.threads = sp.threads_combo.currentData()  # "auto" or a count
        self._holder["cancel"] = job.cancel
        self._watch_window()
        active = _Active(layers, job)
        active.unlike = unlike
        self._active = active
        steps = sp.steps_spin.value()
        active.pbar = progress(total=len(prepared.crops) * steps,
                               desc=f"{self.run_name} {n} × {steps} steps")
        sp.set_running(True)
        self.results.set_enabled(False)
        self.present.set_enabled(False)
        self.model_panel.setEnabled(False)
        sp.status.setText(f"Starting: {n} samples, {steps} steps, {prepared.placement.describe()}"
                          + self._spacing_text(spacing)
                          + ("<br>Image unlike the model's training data: results unlikely to "
                             "be meaningful." if unlike else ""))
        # The sample axis is dims axis 0 of the new layers: show the first sample.
        self.show_sample(0)
        # The callbacks hold the widget and the run weakly: napari keeps finished workers
        # in its task list, and they must not keep a closed viewer alive.
        wref, aref = weakref.ref(self), weakref.ref(active)

        def _cb(method: str) -> Any:
            def call(*args: Any) -> None:
                w, a = wref(), aref()
                if w is not None and a is not None:
                    getattr(w, method)(a, *args)

            return call

        active.worker = create_worker(
            run_job, job,
            _connect={
                "yielded": _cb("_on_yielded"),
                "returned": _cb("_on_returned"),
                "errored": _cb("_on_errored"),
                "finished": _cb("_on_finished"),
            },
        )
        return active.worker

    def _prepare(self) -> PreparedInput:
        """Validate the panels' choices (main thread); raises :class:`InputProblem`."""
        sp = self.sampling
        return prepare_input(self.viewer, self.model, sp.image_combo.layer(),
                             sp.region_layer(), sp.volume_mode())

    def cancel(self, *_: Any) -> None:
        """Stop the run at its next step; the layers keep the last completed step."""
        if self._active is not None and not self._active.done:
            self._active.job.cancel.set()
            try:
                self.sampling.status.setText("Cancelling…")
                self.sampling.cancel_btn.setEnabled(False)
            except RuntimeError:
                pass

    def _on_yielded(self, active: _Active, upd: Update) -> None:
        if active.done or not self._viewer_alive():
            active.job.cancel.set()
            return
        # napari's progress bar processes Qt events while it updates, so other callbacks of
        # this run (even ``finished``) can run inside this one: finish only once we are out.
        self._in_yield += 1
        try:
            if not active.job.cancel.is_set():
                where = (f" · slice {upd.slice_pos + 1}/{upd.n_slices}"
                         if upd.n_slices > 1 else "")
                self.sampling.status.setText(
                    f"Step {upd.step + 1}/{upd.n_steps} (t = {upd.t}){where} · "
                    f"{upd.elapsed:.1f} s"
                )
            if upd.has_data:
                active.layers.push(upd)
                active.last = upd
                # once the frame is drawn (the paint events queued by the push come first),
                # so that the worker can pace its pushes by what showing one costs
                QTimer.singleShot(0, active.job.mark_consumed)
                self.frame_pushed.emit(upd)
            if not upd.catch_up and active.pbar is not None:
                active.pbar.update(1)
        except RuntimeError:  # widgets deleted while the run went on
            active.job.cancel.set()
        finally:
            self._in_yield -= 1
        if active.finish_pending and self._in_yield == 0:
            active.finish_pending = False
            self._on_finished(active)

    def _on_returned(self, active: _Active, outcome: Outcome) -> None:
        active.outcome = outcome

    def _on_errored(self, active: _Active, exc: BaseException) -> None:
        active.error = exc
        _notify.error(f"{self.run_name} failed: {exc}")

    def _on_finished(self, active: _Active) -> None:
        if self._in_yield:
            active.finish_pending = True
            return
        if active.done:
            return
        active.done = True
        if self._holder.get("cancel") is active.job.cancel:
            self._holder["cancel"] = None
        if active.pbar is not None:
            try:
                active.pbar.close()
            except Exception:  # noqa: BLE001
                pass
        outcome = active.outcome
        if self._viewer_alive():
            try:
                self._finish_ui(active, outcome)
            except RuntimeError:
                pass
        if self._active is active:
            self._active = None
        try:
            self.run_finished.emit(outcome)
        except RuntimeError:
            pass

    def _finish_ui(self, active: _Active, outcome: Outcome | None) -> None:
        sp = self.sampling
        sp.set_running(False)
        self.model_panel.setEnabled(True)
        layers = active.layers
        if active.error is not None:
            sp.status.setText(f"<span style='color:#ff6060'>Failed: "
                              f"{html.escape(str(active.error))}</span>")
            if layers.pushed == 0:  # no half-made layers: remove the empty ones
                layers.remove()
                if self.last_run is layers:
                    self.last_run = None
        elif outcome is None or outcome.cancelled:
            upd = active.last
            if upd is None:
                text = "Cancelled before the first step: the layers are empty."
            else:
                where = (f" of slice {upd.slice_pos + 1}/{upd.n_slices}"
                         if upd.n_slices > 1 else "")
                text = (f"Cancelled. The layers show step {upd.step + 1}/{upd.n_steps}{where}"
                        " (intermediate states, not final masks).")
            sp.status.setText(text)
        else:
            sp.status.setText(done_text(layers.n, outcome, layers.samples)
                              + ("<br>Image unlike the model's training data: results unlikely "
                                 "to be meaningful." if active.unlike else ""))
        has_frames = layers.pushed > 0
        if has_frames and active.error is None and layers.alive("samples"):
            # Outlines once the masks are final: each sample reads over the heatmap below.
            layers.layers["samples"].contour = 1
            layers.layers["samples"].opacity = OUTLINE_OPACITY
        self.results.set_enabled(has_frames)
        self.last_outcome = outcome
        self.present.set_enabled(has_frames and active.error is None)
        self._dims_changed()
        if has_frames:
            self.compute_metrics(quiet=True)

    # ------------------------------------------------------------------ browse
    def _samples_layer(self) -> Any | None:
        run = self.last_run
        if run is None or not run.alive("samples"):
            return None
        return run.layers["samples"]

    def _sample_axis(self) -> int | None:
        layer = self._samples_layer()
        if layer is None:
            return None
        return self.viewer.dims.ndim - layer.ndim

    def current_sample(self) -> int | None:
        """Index of the sample the viewer shows (the dims slider of the sample axis)."""
        axis = self._sample_axis()
        if axis is None or self.last_run is None:
            return None
        i = int(round(float(self.viewer.dims.point[axis])))
        return int(np.clip(i, 0, self.last_run.n - 1))

    def show_sample(self, i: int) -> None:
        axis = self._sample_axis()
        if axis is None or self.last_run is None:
            return
        i = int(np.clip(i, 0, self.last_run.n - 1))
        self.viewer.dims.set_point(axis, i)
        self._dims_changed()

    def step_sample(self, delta: int) -> None:
        i = self.current_sample()
        if i is not None and self.last_run is not None:
            self.show_sample((i + delta) % self.last_run.n)

    def _dims_changed(self, *_: Any) -> None:
        try:
            i = self.current_sample()
            if i is None:
                self.results.index_label.setText("no samples yet")
                return
            readers = self.last_run.readers
            self.results.index_label.setText(f"sample {i} / {self.last_run.n - 1}" + (
                f" · reader {i % readers}" if readers else ""))
            self.metrics.highlight(i)
        except RuntimeError:
            pass

    def next_sample(self) -> None:
        self.step_sample(+1)

    def previous_sample(self) -> None:
        self.step_sample(-1)

    def _bind_layer_keys(self, run: RunLayers) -> None:
        for layer in run.all_layers():
            for key, func in self._keys.items():
                layer.bind_key(key, func, overwrite=True)

    # ------------------------------------------------------------------ accept
    def _ready_run(self) -> RunLayers | None:
        if self.last_run is None or self.last_run.pushed == 0:
            _notify.error(f"Nothing to accept yet: press "
                          f"{self.sampling.sample_btn.text()} first.")
            return None
        if self.running:
            _notify.error("Wait for the run to finish (or cancel it) before accepting.")
            return None
        return self.last_run

    def target_layer(self, create: bool = True) -> Any | None:
        """The chosen target Labels layer; a new 'accepted' layer when asked for one."""
        run = self.last_run
        target = self.results.target_combo.layer()
        if target is not None or not create or run is None:
            return target
        from napari.layers import Labels

        from ..geometry import derived_metadata, expand_affine

        p = run.placement
        geometry = derived_metadata(run.geometry, (0,) * len(p.spatial_shape), p.spatial_shape)
        target = Labels(new_target_data(p), name="accepted", scale=p.scale or None,
                        translate=p.translate or None, metadata={TARGET_META: True, **geometry})
        if run.geometry.get("layer_affine") is not None:
            target.affine = expand_affine(run.geometry["layer_affine"], target.ndim)
        target = self.viewer.add_layer(target)
        self.results.target_combo.set_layer(target)
        return target

    def accept(self, *_: Any, index: int | None = None) -> Any | None:
        """Write the sample shown (or ``index``) into the target layer, as one undo step."""
        run = self._ready_run()
        if run is None:
            return None
        i = self.current_sample() if index is None else int(index)
        if i is None:
            _notify.error(f"The '{run.samples_name}' layer was removed: press "
                          f"{self.sampling.sample_btn.text()} again.")
            return None
        self._accept_choice = {"sample": i}
        return self._write(run, run.samples[i] > 0, f"sample {i}")

    def accept_consensus(self, *_: Any) -> Any | None:
        """Write the majority vote (or the frequency threshold) of the samples into the target."""
        run = self._ready_run()
        if run is None:
            return None
        freq = (run.samples > 0).mean(axis=0)
        tau = self.results.consensus_threshold()
        mask = freq > 0.5 if tau is None else freq >= tau
        what = "the majority vote" if tau is None else f"the consensus at frequency ≥ {tau:.2f}"
        self._accept_choice = ({"consensus": "majority", "threshold": 0.5, "rule": "> 0.5"}
                               if tau is None else
                               {"consensus": "frequency", "threshold": tau, "rule": ">="})
        return self._write(run, mask, what)

    def _resolve_target(self, run: RunLayers) -> Any:
        """The layer an accepted mask goes to (created if needed); raises InputProblem."""
        target = self.results.target_combo.layer()
        if target is not None:
            check_target(target, run.placement)
            return target
        return self.target_layer(create=True)

    def _before_write(self, target: Any, run: RunLayers) -> None:
        """Called just before an accepted mask is written into ``target``."""

    def _confirm_empty(self, run: RunLayers, mask: np.ndarray, what: str) -> bool:
        """Whether to go on writing ``mask``: an empty one needs a second press (the first
        says why), as it would erase the mask in the region."""
        key = (run.run_id, what)
        if np.asarray(mask).any():
            self._empty_armed = None
            return True
        if self._empty_armed == key:
            self._empty_armed = None
            return True
        self._empty_armed = key
        _notify.warning(f"{what[0].upper()}{what[1:]} marks nothing: accepting it would erase "
                        "the mask inside the sampled region. Press accept again to do so "
                        "anyway, or browse to another sample.")
        return False

    def _write(self, run: RunLayers, mask: np.ndarray, what: str) -> Any | None:
        if not self._confirm_empty(run, mask, what):
            return None
        try:
            target = self._resolve_target(run)
            self._before_write(target, run)
            label = int(target.selected_label) or 1
            write_mask(target, run.placement, mask, label)
            record_accept(target, run, getattr(self, "_accept_choice", None) or {}, label)
        except InputProblem as exc:
            _notify.error(str(exc))
            return None
        target.visible = True
        self.viewer.layers.selection.active = target
        _notify.info(f"Accepted {what} into '{target.name}'. Ctrl+Z undoes it; "
                     "edit it with the Labels tools.")
        return target

    # ------------------------------------------------------------------ metrics
    def compute_metrics(self, *_: Any, quiet: bool = False) -> dict[str, Any] | None:
        run = self.last_run
        ref = self.metrics.ref_combo.layer()
        if run is None or run.pushed == 0 or ref is None or self.running:
            self.last_metrics = None
            self.metrics.clear("" if ref is not None or run is None
                               else "Choose a reference layer to compare the samples with.")
            return None
        try:
            refs = reference_stack(ref, run.placement)
        except InputProblem as exc:
            self.metrics.clear(html.escape(str(exc)))
            if not quiet:
                _notify.error(str(exc))
            return None
        if np.ndim(ref.data) == len(run.placement.spatial_shape) + 1:
            # annotators on the sample axis would vanish from sample K on: own layers
            lay_out_reference(self.viewer, ref)
        m = sample_metrics(run.samples, refs)
        self.last_metrics = m
        self.metrics.show_metrics(m, ref.name)
        i = self.current_sample()
        if i is not None:
            self.metrics.highlight(i)
        return m

    # ------------------------------------------------------------------ present
    def presentation_text(self) -> str:
        """The headline figures of the last run, as the presentation view shows them."""
        run = self.last_run
        if run is None:
            return ""
        ref = self.metrics.ref_combo.layer()
        steps = self.last_outcome.n_steps if self.last_outcome is not None else None
        return headline(run.n, steps, self.last_metrics, ref.name if ref is not None else "",
                        self.model_panel.model_label)

    def _presentable_run(self) -> RunLayers | None:
        run = self.last_run
        if run is None or run.pushed == 0 or self.running:
            _notify.error("Nothing to present yet: press "
                          f"{self.sampling.sample_btn.text()} and wait for the run to end.")
            return None
        return run

    def open_presentation(self, *_: Any, show: bool = True) -> Any | None:
        """Open the presentation view of the last run (a new 1280×720 napari window)."""
        run = self._presentable_run()
        if run is None:
            return None
        missing = [k for k in ("frequency", "variance") if not run.alive(k)]
        image = self.last_image
        if image is None or image not in self.viewer.layers:
            missing.append("the image")
        if missing:
            _notify.error(f"Cannot present the last run: {', '.join(missing)} was removed. "
                          f"Press {self.sampling.sample_btn.text()} again.")
            return None
        maps = {k: run.layers[k] for k in ("frequency", "variance")}
        self.presentation = _open_presentation(image, maps, self.presentation_text(),
                                               point=tuple(self.viewer.dims.point), show=show)
        return self.presentation

    def _shown_slice(self, run: RunLayers) -> int | None:
        """The volume slice the viewer shows (a volume run's slice index), else None."""
        from ._inputs import MODE_VOLUME

        if run.placement.mode != MODE_VOLUME or not run.alive("samples"):
            return None
        layer = run.layers["samples"]
        data = layer.world_to_data(self.viewer.dims.point[-layer.ndim:])
        return int(np.clip(round(float(data[1])), 0, run.samples.shape[1] - 1))

    def export_animation(self, *_: Any, path: str | None = None) -> Any | None:
        """Save the last run's reverse process as an animated GIF (asks where, unless
        ``path`` is given); a volume run's shown slice. Returns the path written."""
        run = self._presentable_run()
        if run is None:
            return None
        if path is None:
            path = ask_animation_path(self, run.samples_name.lower().replace(" ", "-") + ".gif")
            if not path:
                return None
        title = f"{self.model_panel.model_label} · N = {run.n}"
        return export_animation(self.last_recorder, path, self._shown_slice(run), title)
