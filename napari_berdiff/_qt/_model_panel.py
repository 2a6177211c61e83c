"""The model panel: bundled models, "Open checkpoint…", preset fallback, device, summary."""

from __future__ import annotations

import html
import weakref
from pathlib import Path
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from . import _notify

CHECKPOINT_FILTER = (
    "Checkpoints (*.safetensors *.pt *.pth *.ckpt);;napari-berdiff (*.safetensors);;"
    "Official torch state dicts (*.pt *.pth);;All files (*)"
)


# Engine calls, kept as module functions so that tests can replace them.
def _load_model(path: str, preset: str | None, device: str) -> Any:
    from ..checkpoints import load_model

    return load_model(path, preset=preset, device=device)


def _bundled_models() -> list[Path]:
    try:
        from ..checkpoints import list_bundled_models
    except ImportError:
        return []
    try:
        return [Path(p) for p in list_bundled_models()]
    except Exception:  # noqa: BLE001 - a broken models folder must not break the widget
        return []


def bundled_file_kind(path: Path) -> str | None:
    """The ``kind`` a model file's metadata declares (None when it cannot be read)."""
    try:
        from ..checkpoints import describe

        return describe(path, checksum=False).get("kind")
    except Exception:  # noqa: BLE001 - an unreadable file is simply not offered
        return None


def _preset_names() -> list[str]:
    try:
        from ..model_presets import MODEL_PRESETS
    except ImportError:
        return []
    return sorted(MODEL_PRESETS)


def _devices() -> list[str]:
    from ..diffusion.device import available_devices

    return available_devices()


def _is_preset_problem(exc: BaseException) -> bool:
    """Whether loading failed only because the file does not say which preset it needs."""
    from ..checkpoints import PresetRequired

    return isinstance(exc, PresetRequired)


def _fmt_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.0f} k"
    return str(n)


def _flat_metrics(metrics: Any, prefix: str = "") -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            out.extend(_flat_metrics(v, f"{prefix}{k} " if prefix or isinstance(v, dict)
                                     else f"{k} "))
    elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        out.append((prefix.strip(), float(metrics)))
    return out


_HEADLINE = (("ged2", "GED²"), ("hm_iou", "HM-IoU"), ("soft_dice", "soft Dice"))
#: a refiner's evaluation: (figure before, figure after, label, format)
_REFINER_HEADLINE = (("prior_dice", "refined_dice_samples", "Dice", ".3f"),
                     ("prior_hd95", "refined_hd95_mean_mask", "HD95", ".1f"))


def _mean(block: dict[str, Any], key: str) -> float | None:
    v = block.get(key)
    v = v.get("mean") if isinstance(v, dict) else None
    return v if isinstance(v, (int, float)) else None


def _refiner_line(set_name: str, block: dict[str, Any]) -> str:
    """``prior Dice a → refined b`` figures of a refiner's evaluation block, or ''."""
    parts = []
    for before, after, label, fmt in _REFINER_HEADLINE:
        a, b = _mean(block, before), _mean(block, after)
        if a is not None and b is not None:
            parts.append(f"{label} {a:{fmt}} → {b:{fmt}}")
    if not parts:
        return ""
    n = (block.get(_REFINER_HEADLINE[0][0]) or {}).get("n")
    where = set_name.replace("_", " ") + (f", {n} images" if n else "")
    return f"prior → refined: {' · '.join(parts)} ({where})"


def _metrics_line(metrics: dict[str, Any]) -> str:
    """The model's headline figures from an evaluation block (``{set: {"model": {...}}}``,
    or a refiner's ``{set: {"prior_dice": {"mean": ...}, ...}}``), else the first few plain
    figures."""
    for set_name, block in metrics.items():
        if isinstance(block, dict) and (line := _refiner_line(str(set_name), block)):
            return line
        own = block.get("model") if isinstance(block, dict) else None
        if isinstance(own, dict):
            parts = [f"{label} {own[k]:.3f}" for k, label in _HEADLINE
                     if isinstance(own.get(k), (int, float))]
            if parts:
                n = own.get("n_items")
                where = str(set_name).replace("_", " ") + (f", {n} images" if n else "")
                return f"{' · '.join(parts)} ({where})"
    flat = [(k, v) for k, v in _flat_metrics(metrics) if not k.endswith("_sem")]
    return " · ".join(f"{k} {v:.3g}" for k, v in flat[:4])


def summary_html(model: Any, label: str = "") -> str:
    """A few lines for people: kind, size, diffusion settings, training data, metrics."""
    s = model.summary()
    d = s.get("diffusion", {})
    name = s.get("name") or label or "model"
    readers = getattr(model, "n_readers", 0)
    lines = [f"<b>{html.escape(str(name))}</b> — {html.escape(str(s.get('kind', '')))}"]
    latents = ("a fresh latent z each step"
               + (", stratified over the samples" if d.get("latent_draw") == "stratified" else ""))
    lines.append(
        f"{_fmt_count(int(s.get('parameters', 0)))} parameters · T={d.get('timesteps', '?')} "
        f"{d.get('schedule', '')} · {d.get('prediction', '')} · "
        f"{d.get('default_steps', '?')} "
        + (f"{str(d.get('sampler', '')).upper()} " if s.get("kind") == "gaussian" else "")
        + (f"steps, all of its chain ({latents}; consensus: majority vote)"
           if s.get("kind") == "cdal" else "steps by default")
        + (f" · correlated draws (ρ = {d['draw_correlation']:g})"
           if d.get("draw_correlation") else "")
        + (f" · sharpened steps (temperature {d['temperature']:g})"
           if d.get("temperature", 1.0) != 1.0 else "")
        + (f" · samples drawn as {readers} readers in turn" if readers else "")
    )
    data = s.get("data") or ""
    size = (getattr(model, "data", None) or {}).get("image_size")
    meta = getattr(model, "metadata", {}) or {}
    if (data or size) and not meta.get("untrained"):
        extra = f"{size}×{size}, {model.image_channels} ch. " if size else ""
        text = str(data) or "unknown data"  # in full: users read it before sampling
        lines.append(f"Trained on: {extra}{html.escape(text)}")
    measured = _metrics_line(s.get("metrics") or {})
    if measured:
        lines.append(f"Measured: {html.escape(measured)}")
    if meta.get("untrained"):
        lines.append(
            "<span style='color:#ff6060'><b>UNTRAINED demo model</b>: its samples are "
            "random shapes, not segmentations.</span>"
        )
    return "<br>".join(lines)


class ModelPanel(QGroupBox):
    """Choose, load and place a model. Emits ``model_changed(model)`` once one is ready."""

    model_changed = Signal(object)
    loading_changed = Signal(bool)

    #: runs in the loading worker: ``(path, preset, device) -> result`` for :meth:`_loaded`
    loader = staticmethod(lambda path, preset, device: _load_model(path, preset, device))

    def __init__(self, parent: QWidget | None = None, title: str = "Model"):
        super().__init__(title, parent)
        self.model: Any = None
        self.model_label = ""
        self.loading = False
        self._pending_path: str | None = None
        self._worker: Any = None

        self.bundled = QComboBox()
        self.bundled.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.bundled.setMinimumContentsLength(8)
        self.bundled.setToolTip("Models shipped with napari-berdiff")
        self.load_btn = QPushButton("Load")
        self.open_btn = QPushButton("Open checkpoint…")
        self.open_btn.setToolTip(
            "Our .safetensors files, or official BerDiff / Wolleb .pt state dicts "
            "(then pick a preset if the architecture cannot be recognised)"
        )
        self.preset = QComboBox()
        self.preset.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.preset.setMinimumContentsLength(8)
        self.preset.setToolTip("The architecture of an official checkpoint")
        self.preset_btn = QPushButton("Load")
        self.preset_btn.setToolTip("Load the checkpoint again with this preset")
        self.preset_row = QWidget()
        prow = QHBoxLayout(self.preset_row)
        prow.setContentsMargins(0, 0, 0, 0)
        prow.addWidget(QLabel("Preset:"))
        prow.addWidget(self.preset, 1)
        prow.addWidget(self.preset_btn)
        self.preset_row.setVisible(False)

        self.device = QComboBox()
        self.device.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.device.setMinimumContentsLength(5)
        self.device_label = QLabel("in use: —")
        self.summary = QLabel("No model loaded.")
        self.summary.setWordWrap(True)
        self.summary.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)

        row1 = QHBoxLayout()
        row1.addWidget(self.bundled, 1)
        row1.addWidget(self.load_btn)
        row3 = QHBoxLayout()
        row3.addWidget(self.device, 1)
        row3.addWidget(self.device_label)
        form = QFormLayout()
        form.addRow("Bundled:", row1)
        form.addRow("", self.open_btn)
        form.addRow("Device:", row3)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.preset_row)
        lay.addWidget(self.summary)

        self._fill_bundled()
        self.preset.addItems(_preset_names())
        self.device.addItems(["auto", *_devices()])
        self.device.setToolTip("'auto' picks cuda, then mps, then cpu")

        self.load_btn.clicked.connect(self._load_bundled)
        self.open_btn.clicked.connect(self._open_dialog)
        self.preset_btn.clicked.connect(self._load_with_preset)
        self.device.currentTextChanged.connect(self._device_changed)

    # ------------------------------------------------------------------ list
    def _fill_bundled(self) -> None:
        self.bundled.clear()
        paths = self.bundled_paths()
        for p in paths:
            self.bundled.addItem(p.name.split(".")[0], str(p))
        if not paths:
            self.bundled.addItem("(no bundled models)", None)
        self.bundled.setEnabled(bool(paths))
        self.load_btn.setEnabled(bool(paths))

    def bundled_paths(self) -> list[Path]:
        """The bundled model files this panel offers: the sampling models (refiners and
        segmentors belong to the Mask refiner)."""
        return [p for p in _bundled_models()
                if bundled_file_kind(p) in ("bernoulli", "gaussian", "cdal")]

    def device_choice(self) -> str:
        choice = self.device.currentText() or "auto"
        if choice == "auto":
            from ..diffusion.device import select_device

            return str(select_device("auto"))
        return choice

    # ------------------------------------------------------------------ loading
    def _load_bundled(self) -> None:
        path = self.bundled.currentData()
        if path:
            self.load_path(path)

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open checkpoint", "", CHECKPOINT_FILTER)
        if path:
            self.load_path(path)

    def _load_with_preset(self) -> None:
        if self._pending_path:
            self.load_path(self._pending_path, preset=self.preset.currentText() or None)

    def load_path(self, path: str | Path, preset: str | None = None) -> Any:
        """Load a checkpoint in a worker thread; returns the worker."""
        from napari.qt.threading import create_worker

        path = str(path)
        self._set_loading(True, f"Loading {Path(path).name}…")
        ref = weakref.ref(self)

        def _cb(method: str, *extra: Any) -> Any:
            def call(*args: Any) -> None:
                panel = ref()
                if panel is not None:
                    getattr(panel, method)(*args, *extra)

            return call

        worker = create_worker(
            type(self).loader, path, preset, self.device_choice(),
            _connect={
                "returned": _cb("_loaded", path),
                "errored": _cb("_load_failed", path, preset),
                "finished": _cb("_set_loading", False),
            },
            _progress={"desc": f"Loading {Path(path).name}"},
        )
        self._worker = worker
        return worker

    def _set_loading(self, busy: bool, text: str | None = None) -> None:
        self.loading = busy
        try:
            for w in (self.load_btn, self.open_btn, self.preset_btn, self.device):
                w.setEnabled(not busy)
            self.load_btn.setEnabled(not busy and self.bundled.currentData() is not None)
            if text:
                self.summary.setText(html.escape(text))
            elif not busy and self.model is None:
                self.summary.setText("No model loaded.")
            self.loading_changed.emit(busy)
        except RuntimeError:  # the panel was deleted while loading
            pass

    def _loaded(self, model: Any, path: str) -> None:
        self.preset_row.setVisible(False)
        self._pending_path = None
        self.set_model(model, Path(path).name.split(".")[0])
        _notify.info(f"Loaded {Path(path).name} on {model.device}.")

    def _load_failed(self, exc: BaseException, path: str, preset: str | None) -> None:
        name = Path(path).name
        try:
            if _is_preset_problem(exc) and preset is None:
                self._pending_path = path
                self.preset_row.setVisible(True)
                self.preset.setFocus()
                _notify.error(
                    f"Could not recognise the architecture of {name}. Choose its preset "
                    f"under Model and press 'Load with preset'. ({exc})"
                )
            else:
                _notify.error(f"Could not load {name}: {exc}")
            self.summary.setText(
                summary_html(self.model, self.model_label) if self.model is not None
                else "No model loaded."
            )
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ model
    def set_model(self, model: Any, label: str = "") -> None:
        """Use ``model`` (already built), moving it to the chosen device unless it is 'auto'."""
        self.model = model
        self.model_label = label or getattr(model, "name", "") or "model"
        choice = self.device.currentText()
        if choice and choice != "auto" and str(model.device) != choice:
            model.to(choice)
        self._show_model()
        self.model_changed.emit(model)

    def _show_model(self) -> None:
        if self.model is None:
            self.summary.setText("No model loaded.")
            self.device_label.setText("in use: —")
            return
        self.summary.setText(summary_html(self.model, self.model_label))
        full = self.model.summary()
        self.summary.setToolTip(html.escape(
            "\n".join(f"{k}: {v}" for k, v in full.items() if k != "diffusion")))
        self.device_label.setText(f"in use: <b>{html.escape(str(self.model.device))}</b>")

    def _device_changed(self, choice: str) -> None:
        if self.model is None or not choice:
            return
        try:
            self.model.to(choice)
        except Exception as exc:  # noqa: BLE001
            _notify.error(f"Could not move the model to {choice}: {exc}")
        self._show_model()
        self.model_changed.emit(self.model)
