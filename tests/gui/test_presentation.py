"""The presentation view and the animation export, as a presenter uses them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_berdiff._qt import _widget as widget_module
from napari_berdiff._qt._presentation import PRESENT_SIZE, TITLE

from .conftest import blob, run_and_wait, toy_model

iio = pytest.importorskip("imageio.v3")


def _run_with_reference(viewer, widget, qtbot, n=6, steps=3):
    viewer.add_image(blob(seed=2), name="img")
    yy, xx = np.mgrid[:32, :32]
    annot = np.stack([((yy - 16) ** 2 + (xx - 16) ** 2 < r**2) for r in (6, 7, 8, 9)])
    ref = viewer.add_labels(annot.astype(np.uint8), name="annotators")
    widget.set_model(toy_model(steps=steps), "toy")
    widget.sampling.n_spin.setValue(n)
    widget.sampling.interval_spin.setValue(0)
    widget.metrics.ref_combo.set_layer(ref)
    run_and_wait(qtbot, widget)


def _changed(a, b):
    return np.abs(a[..., :3].astype(int) - b[..., :3].astype(int)).sum(-1) > 30


def _touches_edges(mask, cuts, margin=2):
    """Whether changed pixels reach the canvas border or a grid cell's border."""
    h, w = mask.shape
    strips = [mask[:margin].any(), mask[-margin:].any(), mask[:, :margin].any(),
              mask[:, -margin:].any()]
    for x in cuts:
        strips.append(mask[:, max(0, x - margin):x + margin].any())
    return any(strips)


def test_presentation_view_fits_1280x720_with_no_text_cut_off(docked, qtbot):
    viewer, widget = docked
    assert not widget.present.present_btn.isEnabled()  # nothing to present before a run
    _run_with_reference(viewer, widget, qtbot)
    assert widget.present.present_btn.isEnabled()
    widget.present.present_btn.click()  # as a presenter does
    pv = widget.presentation
    try:
        assert pv is not None and pv.title == TITLE
        win = pv.window._qt_window
        qtbot.waitUntil(lambda: (win.width(), win.height()) == PRESENT_SIZE, timeout=5000)
        names = [lay.name for lay in pv.layers]
        assert names == ["img", "Frequency (of samples)", "Variance (disagreement)"]
        assert pv.canvas.grid.enabled and pv.canvas.grid.actual_shape(pv.layers) == (1, 3)
        assert all(lay.colorbar.visible for lay in pv.layers[1:])
        assert pv.layers[1].data is viewer.layers["frequency"].data  # the run's arrays
        m = widget.last_metrics
        text = pv.canvas.overlays.text.text
        assert f"GED² {m['ged2']:.3f}" in text and f"HM-IoU {m['hm_iou']:.3f}" in text
        assert "N = 6 samples × 3 steps" in text and "4 readers" in text

        # no text cut off: each overlay's pixels stay off the canvas and cell borders
        shot = pv.screenshot(canvas_only=True, flash=False)
        h, w = shot.shape[:2]
        assert w > 0.9 * PRESENT_SIZE[0] and h > 0.75 * PRESENT_SIZE[1]
        spacing = pv.canvas.grid.spacing
        cell = (w - 2 * spacing) / 3
        cuts = [int(cell), int(cell + spacing), int(2 * cell + spacing),
                int(2 * cell + 2 * spacing)]
        groups = {
            "headline": [pv.canvas.overlays.text],
            "names": [lay.name_overlay for lay in pv.layers],
            "colour bars": [lay.colorbar for lay in pv.layers[1:]],
        }
        for what, overlays in groups.items():
            for ov in overlays:
                ov.visible = False
            off = pv.screenshot(canvas_only=True, flash=False)
            for ov in overlays:
                ov.visible = True
            diff = _changed(shot, off)
            assert diff.sum() > 50, f"the {what} draw nothing"
            assert not _touches_edges(diff, cuts if what != "headline" else []), (
                f"the {what} reach a border: cut off")
            if what == "colour bars":  # beside the maps, not over them
                cam = pv.scene.camera
                ext = pv.layers[1].extent
                right = (ext.world[1][-1] + ext.step[-1] / 2 - cam.center[-1]) * cam.zoom
                for i in (1, 2):
                    left_px = i * (cell + spacing)
                    xs = np.nonzero(diff[:, int(left_px):int(left_px + cell)].any(0))[0]
                    assert xs.min() > cell / 2 + right, f"colour bar {i} overlaps its map"
            if what == "headline":  # one block, centred, inside the canvas
                ys, xs = np.nonzero(diff)
                assert xs.min() > 10 and xs.max() < w - 10 and ys.max() < h - 2
                assert abs((xs.min() + xs.max()) / 2 - w / 2) < 0.05 * w
    finally:
        pv.close()


def test_presentation_from_the_layers_menu_command(docked, qtbot, notes, monkeypatch):
    from npe2 import PluginManager

    mf = PluginManager.instance().get_manifest("napari-berdiff")
    menu = mf.contributions.menus["napari/layers/visualize"]
    assert [item.command for item in menu] == ["napari-berdiff.presentation_view"]
    from napari_berdiff._qt._present_command import present_view

    from napari._app_model import get_app_model

    viewer, widget = docked
    # from the menu, napari injects the viewer; with no run yet it says what to do
    app = get_app_model()
    assert app.commands.execute_command("napari-berdiff.presentation_view").result() is None
    assert "press Sample" in notes("error")[-1][1]
    _run_with_reference(viewer, widget, qtbot, n=3, steps=2)
    # the command finds the docked widget and opens its view (the view itself is tested
    # above; a second napari window here would only cost seconds)
    opened = []
    monkeypatch.setattr(widget, "open_presentation", lambda: opened.append(1) or "view")
    assert present_view(viewer) == "view" and opened == [1]


def test_export_animation_writes_one_frame_per_step(docked, qtbot, tmp_path, monkeypatch):
    viewer, widget = docked
    _run_with_reference(viewer, widget, qtbot, n=3, steps=4)
    out = tmp_path / "reverse.gif"
    monkeypatch.setattr(widget_module, "ask_animation_path", lambda *_: str(out))
    widget.present.export_btn.click()  # the save dialog answers `out`
    frames = iio.imread(out, index=None)
    assert frames.shape[0] == 4  # one frame per reverse step
    assert frames.shape[-1] == 3 and frames.shape[2] > 3 * 200


def test_export_of_a_volume_run_shows_the_slice_on_screen(docked, qtbot, tmp_path):
    viewer, widget = docked
    vol = np.stack([blob(24, 24, seed=s, radius=3 + 3 * s) for s in range(3)])
    viewer.add_image(vol, name="vol")
    widget.set_model(toy_model(steps=2, size=24), "toy")
    widget.sampling.n_spin.setValue(2)
    widget.sampling.set_volume_mode("volume")
    run_and_wait(qtbot, widget)
    viewer.dims.set_point(1, 2)  # the slice slider
    assert widget._shown_slice(widget.last_run) == 2
    path = widget.export_animation(path=str(tmp_path / "v.gif"))
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == 2
    # the image panel is slice 2 (its bright disk is the largest of the three)
    img_panel = frames[-1][frames.shape[1] - 256:, :256, 0].astype(float)
    disk = (img_panel > img_panel.mean()).mean()
    assert disk > 0.12
