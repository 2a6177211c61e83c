"""Presenting a run: a slide-ready viewer, and the reverse process as an animation.

:func:`open_presentation` opens a second napari window (1280×720 by default) that lays out
the image, the frequency and the variance side by side (napari's grid), each with its colour
bar and name in large type, and the run's headline figures (N, steps, GED² and HM-IoU against
the readers when a reference exists) on the canvas. It shows the same arrays as the run's
layers (no copies) and leaves the working viewer as it was; closing it is all there is to undo.

:class:`PresentPanel` holds the two buttons of the dock widget: "Presentation view" and
"Export animation…" (the GIF itself is written by :mod:`napari_berdiff.animation`, no Qt).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QPushButton, QWidget

from . import _notify

#: the window size a presentation opens at, and that its text is checked against
PRESENT_SIZE = (1280, 720)
TITLE = "BerDiff presentation"
HEADLINE_FONT = 13
NAME_FONT = 14
COLORBAR_FONT = 12
#: screen pixels kept free in each cell: left of the map, right of it (its colour bar), and
#: above and below it (the cell's name, the headline)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_Y = 12, 96, 80
#: (run layer key, name shown in the cell, opaque colormap)
PANELS = (("frequency", "Frequency (of samples)", "viridis"),
          ("variance", "Variance (disagreement)", "magma"))


def headline(n: int, steps: int | None, metrics: dict[str, Any] | None = None,
             ref_name: str = "", model: str = "") -> str:
    """The run's headline figures: model, N and steps on the first line; against the
    reference (when there is one) GED² and HM-IoU for several readers, else the best IoU,
    on the second."""
    first = " · ".join(([model] if model else [])
                       + [f"N = {n} samples" + (f" × {steps} steps" if steps else "")])
    if not metrics:
        return first
    k = int(metrics["k"])
    if k > 1 and "ged2" in metrics:
        second = (f"vs {k} readers ('{ref_name}'): GED² {metrics['ged2']:.3f} · "
                  f"HM-IoU {metrics['hm_iou']:.3f}")
    else:
        second = f"vs '{ref_name}': best IoU {float(np.max(metrics['best'])):.3f}"
    return f"{first}\n{second}"


def _hide_docks(viewer: Any) -> None:
    """Give the canvas the whole window: hide the layer list and controls (napari has no
    public call for it in 0.9; the View ▸ Window menu shows them again)."""
    qt = getattr(viewer.window, "_qt_viewer", None)
    for name in ("dockLayerList", "dockLayerControls"):
        dock = getattr(qt, name, None)
        if dock is not None:
            dock.setVisible(False)


def open_presentation(image: Any, maps: dict[str, Any], text: str,
                      point: tuple[float, ...] | None = None,
                      size: tuple[int, int] = PRESENT_SIZE, show: bool = True) -> Any:
    """A new napari viewer with ``image | frequency | variance`` side by side.

    ``image``: the run's image layer; ``maps``: its ``frequency`` and ``variance`` layers;
    ``text``: the headline; ``point``: the working viewer's dims point (its last axes give
    the slice shown). Returns the new viewer."""
    import napari
    from napari.layers import Image

    viewer = napari.Viewer(title=TITLE, show=show)
    try:
        _hide_docks(viewer)
        cells = [Image(image.data, name=image.name, colormap=image.colormap,
                       contrast_limits=image.contrast_limits, scale=image.scale,
                       translate=image.translate, rgb=image.rgb,
                       axis_labels=getattr(image, "axis_labels", None))]
        for key, name, cmap in PANELS:
            src = maps[key]
            cells.append(Image(src.data, name=name, colormap=cmap,
                               contrast_limits=src.contrast_limits, scale=src.scale,
                               translate=src.translate, interpolation2d="nearest",
                               axis_labels=getattr(src, "axis_labels", None)))
        for layer in cells:
            viewer.add_layer(layer)
            layer.name_overlay.visible = True
            layer.name_overlay.font_size = NAME_FONT
            layer.name_overlay.color = "white"
        for layer in cells[1:]:
            bar = layer.colorbar
            bar.visible = True
            bar.font_size = COLORBAR_FONT
            bar.size = (16, 200)
            bar.color = "white"
            bar.position = "middle_right"
        overlay = viewer.canvas.overlays.text
        overlay.text = text
        overlay.font_size = HEADLINE_FONT
        overlay.color = "white"
        overlay.position = "bottom_center"
        overlay.box = True
        overlay.visible = True
        grid = viewer.canvas.grid
        grid.shape = (1, len(cells))
        grid.spacing = 12
        grid.enabled = True
        if point is not None and viewer.dims.ndim > 2:
            n = viewer.dims.ndim - 2
            for axis, value in zip(range(n), point[-(n + 2):-2]):
                viewer.dims.set_point(axis, value)
        viewer.window.resize(*size)
        _fit(viewer, len(cells))
    except Exception:
        viewer.close()
        raise
    return viewer


def _fit(viewer: Any, n_cells: int) -> None:
    """Zoom and centre the camera so that each map fits its cell beside its colour bar."""
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()  # let the canvas take the window's new size
    viewer.reset_view()
    h, w = viewer.canvas.size
    spacing = viewer.canvas.grid.spacing
    cell_w = (w - (n_cells - 1) * spacing) / n_cells
    ext = viewer.layers.extent
    lo, hi = np.asarray(ext.world)[:, -2:]
    size = hi - lo + np.asarray(ext.step)[-2:]
    zoom = min((cell_w - MARGIN_LEFT - MARGIN_RIGHT) / size[1], (h - 2 * MARGIN_Y) / size[0])
    if zoom <= 0:
        return
    scene = getattr(viewer, "scene", None)  # napari 0.9: viewer.scene.camera
    camera = scene.camera if scene is not None else viewer.camera
    camera.zoom = float(zoom)
    center = list(camera.center)
    center[-2] = float((lo[0] + hi[0]) / 2)
    # the map sits left of the cell's centre, by half of what the colour bar needs more
    center[-1] = float((lo[1] + hi[1]) / 2 + (MARGIN_RIGHT - MARGIN_LEFT) / 2 / zoom)
    camera.center = tuple(center)


class PresentPanel(QGroupBox):
    """The "Present" group: the presentation view and the animation export."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("Present", parent)
        self.present_btn = QPushButton("Presentation view")
        self.present_btn.setToolTip(
            "Open a 1280×720 window with the image, the frequency and the variance side by "
            "side, colour bars and the run's figures, in large type (for slides)")
        self.export_btn = QPushButton("Export animation…")
        self.export_btn.setToolTip(
            "Save the reverse process, one frame per step, as an animated GIF "
            "(or MP4 with imageio-ffmpeg)")
        row = QHBoxLayout(self)
        row.addWidget(self.present_btn)
        row.addWidget(self.export_btn)
        self.set_enabled(False)

    def set_enabled(self, enabled: bool) -> None:
        self.present_btn.setEnabled(enabled)
        self.export_btn.setEnabled(enabled)


def ask_animation_path(parent: QWidget, default: str) -> str:
    """The file to write, from a save dialog ('' when cancelled)."""
    from qtpy.QtWidgets import QFileDialog

    path, _ = QFileDialog.getSaveFileName(parent, "Export animation", default,
                                          "Animated GIF (*.gif);;MP4 video (*.mp4)")
    return path


def export_animation(recorder: Any, path: str, slice_pos: int | None, title: str) -> Any:
    """Write the animation, reporting problems as notifications; returns the path or None."""
    from ..animation import write_animation

    try:
        out = write_animation(recorder, path, slice_pos=slice_pos, title=title)
    except (ValueError, OSError) as exc:
        _notify.error(f"Could not export the animation: {exc}")
        return None
    _notify.info(f"Saved the reverse process, one frame per step, to {out}.")
    return out
