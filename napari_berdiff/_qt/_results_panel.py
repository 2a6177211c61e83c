"""Browse the samples, accept one (or a consensus) into a Labels layer."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ._layer_combo import LayerCombo
from ._layers import is_result_layer

TARGET_NEW = "new"
TARGET_META = "napari_berdiff_target"

KEY_NEXT = "Alt-Right"
KEY_PREV = "Alt-Left"
KEY_ACCEPT = "Alt-A"

CONSENSUS_MAJORITY = "Majority vote"
CONSENSUS_THRESHOLD = "Frequency ≥ threshold"


class ResultsPanel(QGroupBox):
    def __init__(self, viewer: Any, parent: QWidget | None = None):
        super().__init__("Browse && accept", parent)
        from napari.layers import Labels

        self.prev_btn = QPushButton("◀ Alt+←")
        self.next_btn = QPushButton("Alt+→ ▶")
        self.prev_btn.setToolTip(f"Previous sample ({KEY_PREV.replace('-', '+')})")
        self.next_btn.setToolTip(f"Next sample ({KEY_NEXT.replace('-', '+')})")
        self.index_label = QLabel("no samples yet")
        self.target_combo = LayerCombo(
            viewer, (Labels,), specials=((TARGET_NEW, "New labels layer 'accepted'"),),
            accept=lambda lay: not is_result_layer(lay), prefer_last=False,
        )
        self.target_combo.setToolTip("Where accepted masks are written (undo with Ctrl+Z)")
        self.accept_btn = QPushButton(f"Accept sample ({KEY_ACCEPT.replace('-', '+')})")
        self.accept_btn.setToolTip(
            f"Write the sample shown into the target layer ({KEY_ACCEPT.replace('-', '+')})"
        )
        self.consensus_combo = QComboBox()
        self.consensus_combo.addItems([CONSENSUS_MAJORITY, CONSENSUS_THRESHOLD])
        self.consensus_combo.setToolTip(
            "Majority vote: pixels that more than half of the samples mark (frequency > 0.5). "
            "Frequency ≥ threshold: pixels that at least this fraction of the samples mark."
        )
        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setRange(0.01, 1.0)
        self.tau_spin.setSingleStep(0.05)
        self.tau_spin.setDecimals(2)
        self.tau_spin.setValue(0.5)
        self.tau_spin.setToolTip("The fraction of the samples that must mark a pixel")
        self.consensus_btn = QPushButton("Accept consensus")
        hint = (f"Keys: {KEY_PREV.replace('-', '+')} / {KEY_NEXT.replace('-', '+')} browse, "
                f"{KEY_ACCEPT.replace('-', '+')} accepts, Ctrl+Z undoes")
        self.index_label.setToolTip(hint)
        browse = QHBoxLayout()
        browse.addWidget(self.prev_btn)
        browse.addWidget(self.index_label, 1)
        browse.addWidget(self.next_btn)
        cons = QHBoxLayout()
        cons.addWidget(self.tau_spin)
        cons.addWidget(self.consensus_btn, 1)
        form = QFormLayout()
        form.addRow("Target:", self.target_combo)
        form.addRow("", self.accept_btn)
        form.addRow("Consensus:", self.consensus_combo)
        form.addRow("", cons)
        lay = QVBoxLayout(self)
        lay.addLayout(browse)
        lay.addLayout(form)
        self.consensus_combo.currentIndexChanged.connect(self._mode_changed)
        self._mode_changed()
        self.set_enabled(False)

    def _mode_changed(self, *_: Any) -> None:
        self.tau_spin.setEnabled(self.consensus_combo.currentText() == CONSENSUS_THRESHOLD)

    def consensus_threshold(self) -> float | None:
        """None for a majority vote, else the frequency threshold."""
        if self.consensus_combo.currentText() == CONSENSUS_THRESHOLD:
            return float(self.tau_spin.value())
        return None

    def set_enabled(self, enabled: bool) -> None:
        for w in (self.prev_btn, self.next_btn, self.accept_btn, self.consensus_btn):
            w.setEnabled(enabled)
