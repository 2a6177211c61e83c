"""The "Mask refiner" widget, driven as a user drives it (pytest-qt, Xvfb).

Tiny random condition-once networks stand in for the bundled refiner and segmentor: the
tests check that the widget streams exactly what the engine's ``refine`` gives, and that
the edit → refine → accept → undo loop changes the layers exactly as it should.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from napari_berdiff._qt import _refiner_panel
from napari_berdiff._qt._layers import PROBS
from napari_berdiff._qt._layers import REFINED_SAMPLES as SAMPLES
from napari_berdiff._qt._refiner_panel import SEGMENTOR_TEXT
from napari_berdiff._qt._refiner_widget import TARGET_PRIOR, MaskRefinerWidget
from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel
from napari_berdiff.refine import refine_all

from .conftest import blob

REFINER = ("napari-berdiff", "Mask refiner")


def tiny(kind: str, seed: int = 0) -> DiffusionModel:
    """A random condition-once network (perturbed so that its outputs are not all ½)."""
    from napari_berdiff.networks.condition_once import CondOnceConfig, ConditionOnceNet

    torch.manual_seed(seed)
    channels = 2 if kind == "refiner" else 1
    net = ConditionOnceNet(CondOnceConfig(image_channels=channels, model_channels=8,
                                          encoder_channels=8, channel_mult=(1, 2)))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(torch.randn(prm.shape, generator=gen) * 0.3)
    cfg = DiffusionConfig(kind="bernoulli", timesteps=10, schedule="alpha_bar_linear",
                          prediction="x0", default_steps=10)
    return DiffusionModel(net, cfg, {"kind": kind, "name": f"tiny {kind}"})


def disk(h: int = 32, w: int = 32, centre=(16, 16), radius: float = 7.0) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < radius**2).astype(np.uint8)


@pytest.fixture(autouse=True)
def no_bundled_refiner(monkeypatch):
    """The widget loads the bundled refiner when it exists: not in these tests. The
    reference runs use one thread, as the widget's worker does."""
    monkeypatch.setattr(_refiner_panel, "_bundled_refiners", lambda: [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def refiner_dock(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(*REFINER)
    return viewer, widget


def settings(widget, n=4, steps=4, seed=3, interval_ms=100):
    sp = widget.sampling
    sp.n_spin.setValue(n)
    sp.steps_spin.setValue(steps)
    sp.seed_spin.setValue(seed)
    sp.interval_spin.setValue(interval_ms)


def click(qtbot, button):
    assert button.isEnabled(), f"'{button.text()}' is disabled"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def refine_and_wait(qtbot, widget, timeout=60_000):
    """Click Refine and wait for the run to end; returns its Outcome."""
    with qtbot.waitSignal(widget.run_finished, timeout=timeout) as blocker:
        click(qtbot, widget.sampling.sample_btn)
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)
    return blocker.args[0]


def engine_masks(model, image, prior, n=4, steps=4, seed=3, trust=0.7, **constraints):
    return refine_all(model, image, prior, trust=trust, n=n, steps=steps, seed=seed,
                      **constraints).masks


def test_docks_from_the_manifest(refiner_dock):
    viewer, widget = refiner_dock
    assert isinstance(widget, MaskRefinerWidget)
    assert widget.sampling.sample_btn.text() == "Refine"
    assert widget.prior.trust() == pytest.approx(0.7)
    assert widget.sampling.volume_row.isHidden()
    assert not widget.results.accept_btn.isEnabled() and not widget.undo_btn.isEnabled()
    assert widget.results.target_combo.special() == TARGET_PRIOR
    # without a segmentor, the prior comes from Labels layers only
    texts = [widget.prior.source_combo.itemText(i)
             for i in range(widget.prior.source_combo.count())]
    assert SEGMENTOR_TEXT not in texts
    assert "No prior yet" in widget.prior.hint.text()  # no Labels layer: say what to do
    mask = viewer.add_labels(disk(), name="mask")
    assert widget.prior.layer() is mask and widget.prior.hint.text() == ""


def test_edit_refine_accept_undo_loop(refiner_dock, qtbot, notes):
    viewer, widget = refiner_dock
    image = blob(seed=1)
    viewer.add_image(image, name="img")
    rough = disk(radius=6)
    mask = viewer.add_labels(rough.copy(), name="mask")
    model = tiny("refiner")
    widget.set_model(model, "tiny refiner")
    settings(widget)
    assert widget.prior.layer() is mask

    # refine: the layers hold exactly what the engine gives for this prior
    outcome = refine_and_wait(qtbot, widget)
    assert outcome is not None and not outcome.cancelled
    samples = viewer.layers[SAMPLES].data.copy()
    np.testing.assert_array_equal(samples, engine_masks(model, image, rough))
    assert len({s.tobytes() for s in samples}) > 1  # N different refinements
    for name in ("frequency", "variance", "entropy", PROBS):
        assert name in viewer.layers
    assert "Done" in widget.sampling.status.text()

    # accept sample 2 into the prior layer: exactly that sample, one undo step
    click(qtbot, widget.results.next_btn)
    click(qtbot, widget.results.next_btn)
    assert widget.current_sample() == 2
    click(qtbot, widget.results.accept_btn)
    np.testing.assert_array_equal(mask.data, samples[2])
    assert widget.undo_btn.isEnabled()
    mask.undo()  # napari's own undo (Ctrl+Z) restores the rough mask …
    np.testing.assert_array_equal(mask.data, rough)
    mask.redo()  # … and redo brings the accepted sample back
    np.testing.assert_array_equal(mask.data, samples[2])

    # edit the accepted mask as the brush does, then refine the edited mask
    assert widget.prior.edit_prior() is mask and mask.mode == "paint"
    mask.brush_size = 5
    mask.paint((4, 4), 1)
    edited = mask.data.copy()
    assert edited[4, 4] == 1 and not np.array_equal(edited, samples[2])
    refine_and_wait(qtbot, widget)
    samples2 = viewer.layers[SAMPLES].data.copy()
    # the pixels painted since the accept are kept in every refined mask (hard constraints)
    painted = (edited > 0) & ~(samples[2] > 0)
    assert painted.any()
    np.testing.assert_array_equal(
        samples2, engine_masks(model, image, edited, keep=painted, never=None))
    assert samples2[:, painted].all()
    assert not np.array_equal(samples2, samples)

    # accept again, then "Undo accept" restores exactly the edited mask
    widget.show_sample(1)
    click(qtbot, widget.results.accept_btn)
    np.testing.assert_array_equal(mask.data, samples2[1])
    click(qtbot, widget.undo_btn)
    np.testing.assert_array_equal(mask.data, edited)
    assert any("before the last accept" in t for _, t in notes("info"))
    # the undo is itself one undoable edit
    mask.undo()
    np.testing.assert_array_equal(mask.data, samples2[1])
    mask.redo()
    np.testing.assert_array_equal(mask.data, edited)
    # and the first accept can be taken back too
    click(qtbot, widget.undo_btn)
    np.testing.assert_array_equal(mask.data, rough)
    assert not widget.undo_btn.isEnabled()


def test_bad_priors_notify_and_start_nothing(refiner_dock, qtbot, notes):
    viewer, widget = refiner_dock
    image = blob(seed=2)
    viewer.add_image(image, name="img")
    widget.set_model(tiny("refiner"), "tiny refiner")
    settings(widget, n=2, steps=2)

    def last_error():
        errs = notes("error")
        assert errs, "expected an error notification"
        return errs[-1][1]

    # no prior at all
    assert widget.refine() is None
    assert "no prior mask" in last_error()

    good = viewer.add_labels(disk(), name="good")
    refine_and_wait(qtbot, widget)
    kept = viewer.layers[SAMPLES].data.copy()
    names = [lay.name for lay in viewer.layers]

    def refused(layer, words):
        widget.prior.use_layer(layer)
        n_errors = len(notes("error"))
        click(qtbot, widget.sampling.sample_btn)
        assert not widget.running and widget.worker is None  # nothing started
        assert len(notes("error")) == n_errors + 1
        assert words in last_error()
        # nothing is lost: the previous run's layers are untouched
        assert [lay.name for lay in viewer.layers] == names + added
        np.testing.assert_array_equal(viewer.layers[SAMPLES].data, kept)

    added = ["wrong shape"]
    wrong = viewer.add_labels(np.ones((20, 24), np.uint8), name="wrong shape")
    refused(wrong, "does not match the image")
    added.append("empty")
    empty = viewer.add_labels(np.zeros((32, 32), np.uint8), name="empty")
    refused(empty, "the prior is empty")
    assert "'empty'" in last_error()
    # a sampling model is not a refiner
    from .conftest import toy_model

    widget.prior.use_layer(good)
    widget.set_model(toy_model(steps=2), "toy")
    assert widget.refine() is None
    assert "not a mask refiner" in last_error()
    np.testing.assert_array_equal(viewer.layers[SAMPLES].data, kept)


def test_segmentor_prediction_from_the_default_refiner(make_napari_viewer, qtbot, tmp_path,
                                                      monkeypatch):
    from napari_berdiff.checkpoints import save_model

    refiner, segmentor = tiny("refiner", seed=4), tiny("segmentor", seed=5)
    save_model(segmentor, tmp_path / "seg-tiny.safetensors")
    path = save_model(refiner, tmp_path / "refiner-tiny.safetensors",
                      metadata={"refiner": {"segmentor": "seg-tiny.safetensors"}})
    monkeypatch.setattr(_refiner_panel, "_bundled_refiners", lambda: [path])

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(*REFINER)
    image = blob(seed=3)
    viewer.add_image(image, name="img")
    # the bundled refiner loads by itself, with its segmentor
    qtbot.waitUntil(lambda: widget.model is not None and not widget.model_panel.loading,
                    timeout=30_000)
    assert widget.model.kind == "refiner" and widget.segmentor is not None
    assert "Segmentor" in widget.model_panel.summary.text()
    assert widget.prior.uses_segmentor()  # no Labels layer: the prediction is the prior
    assert widget.prior.source_combo.currentText() == SEGMENTOR_TEXT
    settings(widget, n=3, steps=5, seed=8)
    outcome = refine_and_wait(qtbot, widget)
    assert outcome is not None and not outcome.cancelled
    prob = widget.segmentor.segment(image)
    samples = viewer.layers[SAMPLES].data.copy()
    np.testing.assert_array_equal(
        samples, engine_masks(widget.model, image, prob, n=3, steps=5, seed=8))

    # accepting makes the mask to edit, and the next refine starts from it
    widget.show_sample(0)
    click(qtbot, widget.results.accept_btn)
    accepted = viewer.layers["accepted"]
    np.testing.assert_array_equal(accepted.data, samples[0])
    assert widget.prior.layer() is accepted
    assert widget.results.target_combo.special() == TARGET_PRIOR
    if samples[0].any():
        refine_and_wait(qtbot, widget)
        np.testing.assert_array_equal(
            viewer.layers[SAMPLES].data,
            engine_masks(widget.model, image, samples[0], n=3, steps=5, seed=8))
        assert widget.run_prior is accepted


def test_cancel_mid_run_leaves_consistent_layers(refiner_dock, qtbot):
    viewer, widget = refiner_dock
    viewer.add_image(blob(seed=4), name="img")
    mask = viewer.add_labels(disk(), name="mask")
    model = tiny("refiner")
    predict = model.net.predict

    def slowed(*args):
        time.sleep(0.15)
        return predict(*args)

    model.net.predict = slowed
    widget.set_model(model, "slow refiner")
    settings(widget, n=2, steps=10)
    seen = []

    def on_frame(upd):
        seen.append(upd.step)
        if upd.step >= 1 and widget.sampling.cancel_btn.isEnabled():
            click(qtbot, widget.sampling.cancel_btn)

    widget.frame_pushed.connect(on_frame)
    outcome = refine_and_wait(qtbot, widget)
    assert outcome.cancelled and outcome.steps_done < 10
    run = widget.last_run
    assert run.last_step == outcome.steps_done - 1  # every layer shows the last step done
    np.testing.assert_array_equal(viewer.layers[SAMPLES].data, run.samples)
    assert "Cancelled" in widget.sampling.status.text()
    assert widget.prior.isEnabled() and widget.sampling.sample_btn.isEnabled()
    np.testing.assert_array_equal(mask.data, disk())  # the prior is untouched
    # a full run works afterwards
    widget.frame_pushed.disconnect(on_frame)
    model.net.predict = predict
    settings(widget, n=2, steps=3)
    assert not refine_and_wait(qtbot, widget).cancelled


def test_region_refines_and_accepts_only_inside_the_box(refiner_dock, qtbot):
    viewer, widget = refiner_dock
    image = blob(64, 64, centre=(26, 36), radius=9, seed=5)
    viewer.add_image(image, name="big")
    prior = disk(64, 64, centre=(26, 36), radius=8)
    prior[50:60, 2:12] = 1  # a second blob outside the box: never touched
    mask = viewer.add_labels(prior.copy(), name="mask")
    model = tiny("refiner")
    widget.set_model(model, "tiny refiner")
    settings(widget, n=3, steps=3, seed=2)
    region = widget.sampling.draw_region()
    region.add_rectangles(np.array([[10, 20], [42, 52]]))
    widget.prior.use_layer(mask)
    refine_and_wait(qtbot, widget)
    box = (10, 20, 42, 52)
    assert widget.last_run.placement.roi == box
    samples = viewer.layers[SAMPLES].data.copy()
    assert samples.shape == (3, 32, 32)
    # the prior is softened over the whole image, then cut to the box; the image is cut
    # first (and normalised as cut), as the sampling widget does
    from napari_berdiff.refine import prior_map

    p = prior_map(prior, (64, 64), 0.7)
    ref = refine_all(model, image[10:42, 20:52], p[10:42, 20:52], n=3, steps=3, seed=2).masks
    np.testing.assert_array_equal(samples, ref)
    widget.show_sample(2)
    click(qtbot, widget.results.accept_btn)
    expected = prior.copy()
    expected[10:42, 20:52] = samples[2]
    np.testing.assert_array_equal(mask.data, expected)
    click(qtbot, widget.undo_btn)
    np.testing.assert_array_equal(mask.data, prior)


def test_volume_refines_the_current_slice(refiner_dock, qtbot):
    viewer, widget = refiner_dock
    vol = np.stack([blob(24, 24, seed=s, radius=5 + s) for s in range(3)])
    viewer.add_image(vol, name="vol")
    prior = np.zeros((3, 24, 24), np.uint8)
    prior[2] = disk(24, 24, centre=(12, 12), radius=6)
    mask = viewer.add_labels(prior.copy(), name="mask")
    model = tiny("refiner")
    widget.set_model(model, "tiny refiner")
    settings(widget, n=2, steps=3, seed=1)
    viewer.dims.set_point(0, 0)
    assert widget.refine() is None  # slice 0 of the prior is empty
    viewer.dims.set_point(0, 2)
    refine_and_wait(qtbot, widget)
    samples = viewer.layers[SAMPLES].data.copy()
    assert samples.shape == (2, 1, 24, 24)
    ref = refine_all(model, vol[2], prior[2], n=2, steps=3, seed=1 + 2).masks
    np.testing.assert_array_equal(samples[:, 0], ref)
    widget.show_sample(1)
    click(qtbot, widget.results.accept_btn)
    np.testing.assert_array_equal(mask.data[2], samples[1, 0])
    np.testing.assert_array_equal(mask.data[:2], prior[:2])
    mask.undo()
    np.testing.assert_array_equal(mask.data, prior)


def test_edits_and_keep_never_marks_hold_in_every_refined_mask(refiner_dock, qtbot):
    viewer, widget = refiner_dock
    image = blob(seed=4)
    viewer.add_image(image, name="img")
    rough = disk(radius=6)
    mask = viewer.add_labels(rough.copy(), name="mask")
    model = tiny("refiner", seed=2)
    widget.set_model(model, "tiny refiner")
    settings(widget, n=6, steps=5)
    refine_and_wait(qtbot, widget)  # the first refine: edits count from here

    # the user erases part of the mask and paints a blob away from it with the brush
    widget.prior.edit_prior()
    mask.brush_size = 4
    mask.paint((16, 16), 0)
    mask.paint((26, 26), 1)
    erased = (rough > 0) & (mask.data == 0)
    painted = (rough == 0) & (mask.data > 0)
    assert erased.any() and painted.any()

    # and marks "keep" and "never" pixels on a keep / never layer made by the panel
    widget.prior.new_marks_layer()
    marks = viewer.layers["keep / never"]
    assert widget.prior.marks_layer() is marks and widget.prior.layer() is mask
    assert marks.mode == "paint" and marks.selected_label == 1
    marks.data[4:7, 4:7] = 1
    marks.data[10:13, 20:23] = 2
    marks.refresh()
    refine_and_wait(qtbot, widget)
    samples = viewer.layers[SAMPLES].data
    keep = painted | (marks.data == 1)
    never = (erased | (marks.data == 2)) & ~keep
    assert samples[:, keep].all() and not samples[:, never].any()
    np.testing.assert_array_equal(
        samples, engine_masks(model, image, mask.data.copy(), n=6, steps=5, keep=keep,
                              never=never))

    # with "Keep my edits" off, only the marks hold
    widget.prior.keep_edits_check.setChecked(False)
    refine_and_wait(qtbot, widget)
    samples = viewer.layers[SAMPLES].data
    assert samples[:, marks.data == 1].all() and not samples[:, marks.data == 2].any()
    np.testing.assert_array_equal(
        samples, engine_masks(model, image, mask.data.copy(), n=6, steps=5,
                              keep=marks.data == 1, never=marks.data == 2))


def test_the_threads_setting_is_used_by_the_run(refiner_dock, qtbot):
    import os

    viewer, widget = refiner_dock
    viewer.add_image(blob(seed=5), name="img")
    viewer.add_labels(disk(), name="mask")
    widget.set_model(tiny("refiner"), "tiny refiner")
    settings(widget, n=2, steps=2)
    combo = widget.sampling.threads_combo
    assert combo.currentData() == "auto"  # the shared policy by default
    assert [combo.itemData(i) for i in range(1, combo.count())] == list(
        range(1, (os.cpu_count() or 1) + 1))
    combo.setCurrentIndex(combo.count() - 1)  # the most threads: not what the fixture set
    outcome = refine_and_wait(qtbot, widget)
    assert outcome.threads == combo.currentData()  # torch's count in the worker thread
