"""Per-sample IoU against a reference Labels layer, and GED² / HM-IoU for several annotators."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFormLayout,
    QGroupBox,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._layer_combo import LayerCombo
from ._layers import is_result_layer

REF_NONE = "none"


class MetricsPanel(QGroupBox):
    def __init__(self, viewer: Any, parent: QWidget | None = None):
        super().__init__("Compare with a reference", parent)
        from napari.layers import Labels

        from ._results_panel import TARGET_META

        self.ref_combo = LayerCombo(
            viewer, (Labels,), specials=((REF_NONE, "(none)"),),
            accept=lambda lay: not is_result_layer(lay) and TARGET_META not in lay.metadata,
        )
        self.ref_combo.setToolTip(
            "A Labels layer with the image's shape, or with annotators on a leading axis (K, …)"
        )
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["sample", "IoU", "mean IoU"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setMinimumHeight(90)
        self.table.setMaximumHeight(170)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Reference:", self.ref_combo)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.summary)
        lay.addWidget(self.table)

    def clear(self, text: str = "") -> None:
        self.table.setRowCount(0)
        self.summary.setText(text)

    def show_metrics(self, m: dict[str, Any], ref_name: str) -> None:
        k = int(m["k"])
        best, mean = m["best"], m["mean"]
        n = len(best)
        self.table.setHorizontalHeaderLabels(
            ["sample", "IoU" if k == 1 else "best IoU", "" if k == 1 else "mean IoU"]
        )
        self.table.setColumnHidden(2, k == 1)
        self.table.setRowCount(n)
        for i in range(n):
            cells = [str(i), f"{best[i]:.3f}", f"{mean[i]:.3f}"]
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                self.table.setItem(i, j, item)
        top = int(best.argmax())
        if k > 1:
            text = (f"vs '{ref_name}' ({k} annotators, {n} samples): "
                    f"<b>GED² {m['ged2']:.3f}</b> · <b>HM-IoU {m['hm_iou']:.3f}</b> · "
                    f"best sample {top} (IoU {best[top]:.3f})")
        else:
            text = f"vs '{ref_name}': best sample {top} (IoU {best[top]:.3f})"
        self.summary.setText(text)

    def highlight(self, i: int) -> None:
        if 0 <= i < self.table.rowCount():
            self.table.blockSignals(True)
            self.table.selectRow(i)
            self.table.blockSignals(False)
