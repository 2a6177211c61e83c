"""The "Diffusion segmentation" widget, driven as a user drives it (pytest-qt, Xvfb)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_berdiff._qt._layers import PROBS, SAMPLES
from napari_berdiff._qt._preload import preload
from napari_berdiff._qt._widget import DiffusionSegmentationWidget
from napari_berdiff.uncertainty import MAP_LIMITS, ged2, hm_iou, pairwise_iou

from .conftest import blob, run_and_wait, tiny_unet_model, toy_model


def _layer(viewer, name):
    return viewer.layers[name]


def _settings(widget, n=4, steps=None, seed=7, interval_ms=0):
    sp = widget.sampling
    sp.n_spin.setValue(n)
    if steps is not None:
        sp.steps_spin.setValue(steps)
    sp.seed_spin.setValue(seed)
    sp.interval_spin.setValue(interval_ms)


def test_docks_from_the_manifest(docked):
    viewer, widget = docked
    assert isinstance(widget, DiffusionSegmentationWidget)
    assert widget.viewer is not None
    # nothing sampled yet, nothing to accept
    assert not widget.results.accept_btn.isEnabled()
    assert widget.model is None
    # the first run's imports were started off the main thread, and they end
    widget.preloading.join(timeout=60)
    assert not widget.preloading.is_alive()
    assert "napari_berdiff.uncertainty" in sys.modules


def test_preload_imports_in_the_background_and_skips_what_fails():
    sys.modules.pop("colorsys", None)  # a standard module nothing here imports
    thread = preload(["no_such_module_for_berdiff", "colorsys"])
    assert thread.daemon
    thread.join(timeout=30)
    assert "colorsys" in sys.modules


def test_bundled_list_offers_sampling_models_only(docked):
    from napari_berdiff.checkpoints import describe, list_bundled_models

    _viewer, widget = docked
    combo = widget.model_panel.bundled
    offered = [combo.itemData(i) for i in range(combo.count()) if combo.itemData(i)]
    expected = [str(p) for p in list_bundled_models()
                if describe(p, checksum=False)["kind"] in ("bernoulli", "gaussian", "cdal")]
    assert expected and offered == expected
    assert "unet-phantom-64" not in {Path(p).stem for p in offered}  # the segmentor baseline


def test_run_streams_frames_then_fills_heatmaps(docked, qtbot):
    viewer, widget = docked
    image = blob(seed=1)
    viewer.add_image(image, name="img")
    model = tiny_unet_model(steps=6)
    predict = model.net.predict

    def slowed(*args):  # a step long enough for the layers to take every frame
        time.sleep(0.05)
        return predict(*args)

    model.net.predict = slowed
    widget.set_model(model, "tiny")
    assert widget.sampling.steps_spin.value() == 6  # the model's default
    _settings(widget, n=3, seed=11, interval_ms=0)

    seen = []
    widget.frame_pushed.connect(
        lambda u: seen.append((u.final, _layer(viewer, SAMPLES).data.copy()))
    )
    outcome = run_and_wait(qtbot, widget)
    assert not outcome.cancelled and outcome.steps_done == 6

    before_final = [d for final, d in seen if not final]
    distinct = {d.tobytes() for d in before_final}
    assert len(distinct) >= 2, "at least two distinct frames must stream before the end"
    assert seen[-1][0], "the last frame shown is the final one"

    # The layers hold exactly what the engine gives for the same seed.
    model.net.predict = predict
    ref = model.sample_all(image, n=3, steps=6, seed=11)
    samples = _layer(viewer, SAMPLES)
    assert samples.data.shape == (3, 32, 32) and samples.data.dtype == np.uint8
    np.testing.assert_array_equal(samples.data, ref.masks)
    np.testing.assert_allclose(_layer(viewer, PROBS).data, ref.probs, atol=1e-6)
    for key in ("frequency", "variance", "entropy"):
        layer = _layer(viewer, key)
        np.testing.assert_allclose(layer.data, ref.maps[key], atol=1e-6)
        assert tuple(layer.contrast_limits) == pytest.approx(MAP_LIMITS[key])
    assert _layer(viewer, "entropy").data.max() > 0  # the heatmaps are filled
    assert "Done" in widget.sampling.status.text()
    assert widget.results.accept_btn.isEnabled()


def test_temperature_box_follows_the_model_and_drives_the_run(docked, qtbot):
    """The box shows the loaded model's temperature; a user's other value is what the run
    samples with (the layers equal the engine's run at that temperature); a Gaussian model
    disables the box."""
    from dataclasses import replace

    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel

    viewer, widget = docked
    image = blob(seed=2)
    viewer.add_image(image, name="img")
    model = toy_model(steps=4)
    box = widget.sampling.temperature_spin
    widget.set_model(model, "toy")
    assert box.value() == 1.0 and box.isEnabled()
    _settings(widget, n=4, seed=5)
    box.setValue(0.25)
    run_and_wait(qtbot, widget)
    sharp = model.sample_all(image, n=4, steps=4, seed=5, temperature=0.25)
    plain = model.sample_all(image, n=4, steps=4, seed=5)
    assert not np.array_equal(sharp.masks, plain.masks)
    np.testing.assert_array_equal(_layer(viewer, SAMPLES).data, sharp.masks)

    own = DiffusionModel(model.net, replace(model.diffusion, temperature=0.25), model.metadata)
    widget.set_model(own, "toy at 0.25")
    assert box.value() == 0.25
    assert widget.sampling.temperature(own) is None  # the model's own: no override
    odd = DiffusionModel(model.net, replace(model.diffusion, temperature=0.125), model.metadata)
    widget.set_model(odd, "toy at 0.125")  # shown as 0.13 (two decimals), still the model's own
    assert widget.sampling.temperature(odd) is None

    gauss = DiffusionModel(model.net, DiffusionConfig(kind="gaussian", timesteps=100,
                                                      default_steps=4), model.metadata)
    widget.set_model(gauss, "toy gaussian")
    assert not box.isEnabled() and box.value() == 1.0
    assert widget.sampling.temperature(gauss) is None


def test_a_presence_model_leaves_unmarked_samples_empty_and_says_so(docked, qtbot):
    """A model with a presence head: the status gives its probability that a reader marks
    the lesion, and the samples drawn unmarked are empty masks, as the engine gives them."""
    import torch

    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.networks import CondOnceConfig, ConditionOnceNet

    viewer, widget = docked
    image = blob()
    viewer.add_image(image, name="img")
    torch.manual_seed(0)
    net = ConditionOnceNet(CondOnceConfig(image_size=32, model_channels=8, encoder_channels=8,
                                          channel_mult=(1, 2), presence_head=True)).eval()
    with torch.no_grad():
        net.presence_out.weight.zero_()
        net.presence_out.bias.fill_(float(np.log(0.6 / 0.4)))  # p = 0.6 for any image
    model = DiffusionModel(net, DiffusionConfig(kind="bernoulli", timesteps=100,
                                                default_steps=2))
    widget.set_model(model, "presence")
    _settings(widget, n=12, seed=4)
    outcome = run_and_wait(qtbot, widget)
    assert outcome.presence == pytest.approx(0.6, abs=1e-6)
    status = widget.sampling.status.text()
    assert "The model estimates that 60% of readers would mark one" in status
    ref = model.sample_all(image, n=12, steps=2, seed=4)
    probs = _layer(viewer, PROBS).data
    np.testing.assert_allclose(probs, ref.probs, atol=1e-6)
    unmarked = ~probs.reshape(12, -1).any(1)
    assert 0 < unmarked.sum() < 12  # seed 4 draws both kinds
    assert not _layer(viewer, SAMPLES).data[unmarked].any()
    n_empty = int((~_layer(viewer, SAMPLES).data.reshape(12, -1).any(1)).sum())
    assert n_empty >= unmarked.sum()
    # what the status counts is what browsing the samples shows
    assert f"{12 - n_empty} of 12 samples mark a lesion." in status


def test_a_reader_model_labels_each_sample_with_its_reader(docked, qtbot):
    """A reader-conditioned model: browsing shows which reader each sample was drawn as,
    and the layers hold the engine's samples for those readers."""
    import torch

    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.networks import CondOnceConfig, ConditionOnceNet

    viewer, widget = docked
    image = blob()
    viewer.add_image(image, name="img")
    torch.manual_seed(0)
    net = ConditionOnceNet(CondOnceConfig(image_size=32, model_channels=8, encoder_channels=8,
                                          channel_mult=(1, 2), readers=3)).eval()
    with torch.no_grad():
        net.reader_embed.weight.normal_()
    model = DiffusionModel(net, DiffusionConfig(kind="bernoulli", timesteps=100,
                                                default_steps=2))
    widget.set_model(model, "readers")
    _settings(widget, n=5, seed=2)
    run_and_wait(qtbot, widget)
    labels = []
    for _ in range(5):
        labels.append(widget.results.index_label.text())
        widget.results.next_btn.click()
    assert labels == [f"sample {i} / 4 · reader {i % 3}" for i in range(5)]
    from napari_berdiff._qt._model_panel import summary_html

    assert "steps by default · samples drawn as 3 readers in turn" in summary_html(model)
    assert "readers" not in summary_html(toy_model(steps=2))
    ref = model.sample_all(image, n=5, steps=2, seed=2)
    np.testing.assert_allclose(_layer(viewer, PROBS).data, ref.probs, atol=1e-6)


def test_rerun_replaces_layers_unless_kept(docked, qtbot):
    viewer, widget = docked
    image = blob()
    viewer.add_image(image, name="img")
    model = toy_model(steps=2)
    widget.set_model(model, "toy")
    _settings(widget, n=2, seed=1)
    run_and_wait(qtbot, widget)
    first = list(viewer.layers)
    assert _layer(viewer, SAMPLES).contour == 1  # outlines once final
    # Same region and N: the run takes over the layers (none removed or re-created) and
    # they show the new run's results, not a mix with the old ones.
    _settings(widget, n=2, seed=2)
    widget.sample()
    assert list(viewer.layers) == first
    assert not _layer(viewer, SAMPLES).data.any() and _layer(viewer, SAMPLES).contour == 0
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    ref = model.sample_all(image, n=2, steps=2, seed=2)
    np.testing.assert_array_equal(_layer(viewer, SAMPLES).data, ref.masks)
    np.testing.assert_allclose(_layer(viewer, "frequency").data, ref.maps["frequency"])
    assert all(lay.metadata["napari_berdiff"]["run"] == 2 for lay in first[1:])
    # Another N: new layers replace the old ones.
    _settings(widget, n=3)
    run_and_wait(qtbot, widget)
    names = [lay.name for lay in viewer.layers]
    assert names.count(SAMPLES) == 1 and len(names) == 6
    assert _layer(viewer, SAMPLES) is not first[-1] and first[-1] not in viewer.layers
    assert _layer(viewer, SAMPLES).data.shape[0] == 3
    widget.sampling.keep_check.setChecked(True)
    run_and_wait(qtbot, widget)
    names = [lay.name for lay in viewer.layers]
    assert SAMPLES in names and f"{SAMPLES} (run 3)" in names and len(names) == 11


def test_cancel_stops_within_one_step(docked, qtbot):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    model = toy_model(steps=40, delay=0.05)
    net = model.net
    widget.set_model(model, "slow toy")
    _settings(widget, n=2, steps=40, interval_ms=0)
    state = {}

    def on_frame(upd):
        if upd.step >= 2 and "calls" not in state:
            state["calls"] = net.calls  # forward passes done when the user presses Cancel
            widget.sampling.cancel_btn.click()

    widget.frame_pushed.connect(on_frame)
    outcome = run_and_wait(qtbot, widget)
    assert outcome.cancelled
    assert net.calls <= state["calls"] + 1, "cancel must take effect at the next step"
    assert outcome.steps_done < 40
    run = widget.last_run
    # consistent layers: every layer shows the last completed step
    assert run.last_step == outcome.steps_done - 1
    assert "Cancelled" in widget.sampling.status.text()
    assert widget.sampling.sample_btn.isEnabled() and not widget.sampling.cancel_btn.isEnabled()
    # and the next run works
    model.net.delay = 0.0
    widget.sampling.steps_spin.setValue(2)
    assert not run_and_wait(qtbot, widget).cancelled


def test_accept_then_undo_round_trips(docked, qtbot, notes):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    widget.set_model(toy_model(steps=3), "toy")
    _settings(widget, n=4)
    run_and_wait(qtbot, widget)
    samples = _layer(viewer, SAMPLES).data
    assert samples[2].any() and not np.array_equal(samples[2], samples[1])

    widget.show_sample(2)
    assert widget.current_sample() == 2
    target = widget.accept()
    assert target.name == "accepted" and target.data.shape == (32, 32)
    np.testing.assert_array_equal(target.data > 0, samples[2] > 0)
    assert viewer.layers.selection.active == target  # ready for the Labels tools
    target.undo()
    assert not target.data.any()
    target.redo()
    np.testing.assert_array_equal(target.data > 0, samples[2] > 0)

    # accepting another sample replaces the first in one undoable step
    widget.results.next_btn.click()
    assert widget.current_sample() == 3
    widget.accept()
    np.testing.assert_array_equal(target.data > 0, samples[3] > 0)
    target.undo()
    np.testing.assert_array_equal(target.data > 0, samples[2] > 0)


def test_accept_into_existing_layer_keeps_other_labels(docked, qtbot):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    existing = np.zeros((32, 32), np.uint8)
    existing[0:4, 0:4] = 2   # another structure, label 2
    existing[20:24, 2:6] = 1  # an old label-1 mask: replaced by the accepted sample
    target = viewer.add_labels(existing.copy(), name="lesions")
    widget.set_model(toy_model(steps=2), "toy")
    _settings(widget, n=2)
    run_and_wait(qtbot, widget)
    widget.results.target_combo.set_layer(target)
    widget.show_sample(1)
    assert widget.accept() == target
    mask = _layer(viewer, SAMPLES).data[1] > 0
    expected = existing.copy()
    expected[(expected == 1) & ~mask] = 0  # the old label-1 mask is replaced …
    expected[mask] = 1                      # … by the accepted sample
    np.testing.assert_array_equal(target.data, expected)
    assert (target.data[~mask & (existing == 2)] == 2).all()  # the other structure stays
    target.undo()
    np.testing.assert_array_equal(target.data, existing)


def test_consensus_majority_and_threshold(docked, qtbot, notes):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    widget.set_model(toy_model(steps=3), "toy")
    _settings(widget, n=5)
    run_and_wait(qtbot, widget)
    freq = (_layer(viewer, SAMPLES).data > 0).mean(0)
    target = widget.accept_consensus()
    np.testing.assert_array_equal(target.data > 0, freq > 0.5)
    widget.results.consensus_combo.setCurrentIndex(1)
    widget.results.tau_spin.setValue(0.2)
    widget.accept_consensus()
    np.testing.assert_array_equal(target.data > 0, freq >= 0.2)
    # named as a frequency, not "τ", which would read as the sampling temperature
    assert widget.results.consensus_combo.currentText() == "Frequency ≥ threshold"
    assert any("the consensus at frequency ≥ 0.20" in text for _, text in notes("info"))
    target.undo()
    np.testing.assert_array_equal(target.data > 0, freq > 0.5)


def test_region_maps_back_to_the_right_pixels(docked, qtbot):
    viewer, widget = docked
    image = blob(64, 64, centre=(26, 36), radius=9, seed=3)
    img_layer = viewer.add_image(image, name="big", scale=(2.0, 2.0), translate=(5.0, 7.0))
    model = toy_model(steps=3)
    widget.set_model(model, "toy")
    _settings(widget, n=3, seed=5)
    # "Draw box" gives a Shapes layer aligned with the image: a rectangle over data rows
    # 10..41 and columns 20..51 (corners on pixel centres, the far ones excluded)
    region = widget.sampling.draw_region()
    assert widget.sampling.region_layer() == region
    np.testing.assert_allclose(region.scale, img_layer.scale)
    region.add_rectangles(np.array([[10, 20], [42, 52]]))
    run_and_wait(qtbot, widget)
    assert widget.last_run.placement.roi == (10, 20, 42, 52)
    # the same box drawn in a Shapes layer without a transform, i.e. in world coordinates
    plain = viewer.add_shapes(np.array([[[5 + 2 * 10, 7 + 2 * 20], [5 + 2 * 42, 7 + 2 * 52]]]),
                              shape_type="rectangle", name="world box")
    widget.sampling.region_combo.set_layer(plain)
    run_and_wait(qtbot, widget)
    assert widget.last_run.placement.roi == (10, 20, 42, 52)

    samples = _layer(viewer, SAMPLES)
    assert samples.data.shape == (3, 32, 32)
    np.testing.assert_allclose(samples.scale, (1, 2, 2))
    np.testing.assert_allclose(samples.translate, (0, 5 + 2 * 10, 7 + 2 * 20))
    np.testing.assert_allclose(_layer(viewer, "frequency").translate, (25, 47))
    ref = model.sample_all(image[10:42, 20:52], n=3, steps=3, seed=5)
    np.testing.assert_array_equal(samples.data, ref.masks)
    # a world point over data pixel (30, 40) of the image is sample pixel (20, 20)
    world = img_layer.data_to_world((30, 40))
    np.testing.assert_allclose(samples.world_to_data((0, *world))[1:], (20, 20))

    widget.show_sample(1)
    target = widget.accept()
    assert target.data.shape == (64, 64)
    np.testing.assert_allclose(target.scale, img_layer.scale)
    np.testing.assert_allclose(target.translate, img_layer.translate)
    expected = np.zeros((64, 64), bool)
    expected[10:42, 20:52] = ref.masks[1] > 0
    np.testing.assert_array_equal(target.data > 0, expected)


def test_volume_current_slice(docked, qtbot):
    viewer, widget = docked
    vol = np.stack([blob(24, 24, seed=s, radius=5 + s) for s in range(3)])
    viewer.add_image(vol, name="vol")
    model = toy_model(steps=2, size=24)
    widget.set_model(model, "toy")
    _settings(widget, n=2, seed=3)
    assert widget.sampling.volume_row.isEnabled()
    viewer.dims.set_point(0, 2)
    widget.sampling.set_volume_mode("slice")
    run_and_wait(qtbot, widget)
    samples = _layer(viewer, SAMPLES)
    assert samples.data.shape == (2, 1, 24, 24)
    np.testing.assert_allclose(samples.translate, (0, 2, 0, 0))
    ref = model.sample_all(vol[2], n=2, steps=2, seed=3 + 2)
    np.testing.assert_array_equal(samples.data[:, 0], ref.masks)
    np.testing.assert_allclose(_layer(viewer, "frequency").data[0], ref.maps["frequency"])
    target = widget.accept(index=1)
    assert target.data.shape == (3, 24, 24)
    np.testing.assert_array_equal(target.data[2] > 0, ref.masks[1] > 0)
    assert not target.data[:2].any()


def test_volume_all_slices(docked, qtbot):
    viewer, widget = docked
    vol = np.stack([blob(24, 24, seed=s, radius=5 + s) for s in range(3)])
    viewer.add_image(vol, name="vol")
    model = toy_model(steps=2, size=24)
    widget.set_model(model, "toy")
    _settings(widget, n=2, seed=3)
    widget.sampling.set_volume_mode("volume")
    outcome = run_and_wait(qtbot, widget)
    assert outcome.slices_done == 3 and not outcome.cancelled
    samples = _layer(viewer, SAMPLES)
    assert samples.data.shape == (2, 3, 24, 24)
    np.testing.assert_allclose(samples.translate, (0, 0, 0, 0))
    for z in range(3):
        ref = model.sample_all(vol[z], n=2, steps=2, seed=3 + z)
        np.testing.assert_array_equal(samples.data[:, z], ref.masks)
        np.testing.assert_allclose(_layer(viewer, "variance").data[z], ref.maps["variance"])
    target = widget.accept(index=0)
    np.testing.assert_array_equal(target.data > 0, samples.data[0] > 0)


def test_browse_with_buttons_and_keys(docked, qtbot):
    from app_model.types import KeyBinding

    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    widget.set_model(toy_model(steps=2), "toy")
    _settings(widget, n=3)
    run_and_wait(qtbot, widget)
    assert widget.current_sample() == 0
    widget.results.next_btn.click()
    assert widget.current_sample() == 1
    assert widget.results.index_label.text() == "sample 1 / 2"
    widget.results.prev_btn.click()
    widget.results.prev_btn.click()  # wraps around
    assert widget.current_sample() == 2

    nxt = KeyBinding.from_str("Alt+Right")
    prev = KeyBinding.from_str("Alt+Left")
    viewer.keymap[nxt](viewer)
    assert widget.current_sample() == 0
    samples = _layer(viewer, SAMPLES)
    assert nxt in samples.keymap and prev in samples.keymap  # our layers' keymaps win
    samples.keymap[nxt](samples)
    assert widget.current_sample() == 1
    samples.keymap[prev](samples)
    assert widget.current_sample() == 0
    # the keys clash with none of napari's defaults
    from napari.utils.shortcuts import default_shortcuts

    used = {str(k) for keys in default_shortcuts.values() for k in keys}
    assert not {"Alt+Right", "Alt+Left", "Alt+A"} & used


def test_metrics_against_annotators(docked, qtbot):
    viewer, widget = docked
    image = blob(seed=2)
    viewer.add_image(image, name="img")
    yy, xx = np.mgrid[:32, :32]
    annot = np.stack([((yy - 16) ** 2 + (xx - 16) ** 2 < r**2) for r in (6, 7, 8, 9)])
    ref_layer = viewer.add_labels(annot.astype(np.uint8), name="annotators")
    widget.set_model(toy_model(steps=3), "toy")
    _settings(widget, n=4)
    widget.metrics.ref_combo.set_layer(ref_layer)
    run_and_wait(qtbot, widget)
    m = widget.last_metrics
    s = _layer(viewer, SAMPLES).data > 0
    assert m["ged2"] == pytest.approx(ged2(s, annot))
    assert m["hm_iou"] == pytest.approx(hm_iou(s, annot))
    np.testing.assert_allclose(m["best"], pairwise_iou(s, annot).max(1))
    assert widget.metrics.table.rowCount() == 4
    assert "GED²" in widget.metrics.summary.text()
    # a single-annotation reference gives plain IoU, no GED
    single = viewer.add_labels(annot[2].astype(np.uint8), name="one")
    widget.metrics.ref_combo.set_layer(single)
    m1 = widget.last_metrics
    assert m1["k"] == 1 and "ged2" not in m1
    np.testing.assert_allclose(m1["best"], pairwise_iou(s, annot[2:3])[:, 0])
    # clicking a row shows that sample
    widget.metrics.table.cellClicked.emit(3, 0)
    assert widget.current_sample() == 3


def test_bad_input_notifications(docked, qtbot, notes):
    viewer, widget = docked

    def last_error():
        errs = notes("error")
        assert errs, "expected an error notification"
        return errs[-1][1]

    # no model
    viewer.add_image(blob(), name="img")
    assert widget.sample() is None
    assert "No model is loaded" in last_error()
    widget.set_model(toy_model(steps=2), "toy")
    viewer.layers.clear()
    # no image layer
    assert widget.sample() is None
    assert "no image layer" in last_error()
    # an RGB image
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="photo", rgb=True)
    assert widget.sample() is None
    assert "RGB" in last_error()
    viewer.layers.clear()
    # NaNs
    bad = blob()
    bad[3, 4] = np.nan
    viewer.add_image(bad, name="nans")
    assert widget.sample() is None
    assert "NaN" in last_error()
    viewer.layers.clear()
    # an image far larger than the training size, without a region: a prompt, no crop
    viewer.add_image(blob(200, 200), name="large")
    assert widget.sample() is None
    msg = last_error()
    assert "region of interest" in msg and "Draw box" in msg
    assert [lay.name for lay in viewer.layers] == ["large"]
    viewer.layers.clear()
    # a channel count the model does not take
    widget.set_model(toy_model(steps=2, channels=2), "two-channel")
    viewer.add_image(blob(), name="one channel")
    assert widget.sample() is None
    assert "takes 2 image channels" in last_error()
    viewer.layers.clear()
    # an image much smaller than the training size: a warning, and the run goes on
    widget.set_model(toy_model(steps=2), "toy")
    viewer.add_image(blob(10, 10, radius=3), name="small")
    _settings(widget, n=2)
    outcome = run_and_wait(qtbot, widget)
    assert not outcome.cancelled
    assert any("trained on 32×32" in text for _, text in notes("warning"))
    # accept into a target of the wrong shape
    wrong = viewer.add_labels(np.zeros((5, 5), np.uint8), name="wrong")
    widget.results.target_combo.set_layer(wrong)
    assert widget.accept() is None
    assert "has shape (5, 5)" in last_error()
    # a reference of the wrong shape
    widget.metrics.ref_combo.set_layer(wrong)
    assert widget.compute_metrics() is None
    assert "reference layer 'wrong'" in last_error()


def test_refiners_and_segmentors_are_refused_here():
    from types import SimpleNamespace

    from napari_berdiff._qt._inputs import InputProblem, prepare_input

    for kind, words in (("refiner", "Mask refiner"), ("segmentor", "cannot draw samples")):
        with pytest.raises(InputProblem, match=words):
            prepare_input(None, SimpleNamespace(kind=kind), None, None)


def test_load_errors_are_notifications(docked, qtbot, notes, tmp_path, monkeypatch):
    from napari_berdiff._qt import _model_panel

    viewer, widget = docked
    panel = widget.model_panel
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    panel.load_path(bad)
    qtbot.waitUntil(lambda: not panel.loading, timeout=30_000)
    assert any("Could not load garbage.pt" in t for _, t in notes("error"))
    assert widget.model is None and panel.preset_row.isHidden()

    calls = []

    def fake_load(path, preset, device):
        calls.append(preset)
        if preset is None:
            from napari_berdiff.checkpoints import PresetRequired

            raise PresetRequired("official.pt matches no known preset; known presets: a, b")
        return toy_model(steps=3)

    monkeypatch.setattr(_model_panel, "_load_model", fake_load)
    panel.load_path(tmp_path / "official.pt")
    qtbot.waitUntil(lambda: not panel.loading, timeout=30_000)
    assert not panel.preset_row.isHidden()
    assert any("Choose its preset" in t for _, t in notes("error"))
    assert panel.preset.count() > 0  # the known presets
    panel.preset_btn.click()
    qtbot.waitUntil(lambda: not panel.loading and widget.model is not None, timeout=30_000)
    assert calls[0] is None and calls[1] is not None
    assert widget.model is not None and panel.preset_row.isHidden()
    assert "in use: <b>cpu</b>" in panel.device_label.text()
    assert widget.sampling.steps_spin.value() == 3


def test_closing_the_viewer_mid_run_raises_nothing(make_napari_viewer, qtbot):
    from .conftest import WIDGET

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(*WIDGET)
    viewer.add_image(blob(), name="img")
    model = toy_model(steps=200, delay=0.03)
    widget.set_model(model, "slow toy")
    _settings(widget, n=2, steps=200)
    first = []
    widget.frame_pushed.connect(lambda u: first.append(u))
    worker = widget.sample()
    qtbot.waitUntil(lambda: len(first) > 0, timeout=30_000)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=30_000)
    qtbot.wait(100)
    assert model.net.calls < 200  # the run stopped early


def test_errors_in_the_worker_become_notifications(docked, qtbot, notes):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    model = toy_model(steps=3)

    def broken(x_t, t, cond):
        raise RuntimeError("boom")  # torch raises RuntimeError; it must not be swallowed

    model.net.predict = broken
    widget.set_model(model, "broken")
    outcome = run_and_wait(qtbot, widget)
    assert outcome is None
    assert any("Sampling failed" in t and "boom" in t for _, t in notes("error"))
    assert "Failed" in widget.sampling.status.text()
    assert [lay.name for lay in viewer.layers] == ["img"]  # no empty result layers left
    assert widget.sampling.sample_btn.isEnabled()


def test_multichannel_model_takes_a_channel_first_image(docked, qtbot):
    viewer, widget = docked
    img = np.stack([blob(seed=1), blob(seed=2)])
    viewer.add_image(img, name="two channels")
    model = toy_model(steps=2, channels=2)
    widget.set_model(model, "two-channel")
    _settings(widget, n=2, seed=4)
    run_and_wait(qtbot, widget)
    samples = _layer(viewer, SAMPLES)
    assert samples.data.shape == (2, 32, 32)
    np.testing.assert_array_equal(samples.data, model.sample_all(img, n=2, steps=2, seed=4).masks)
    assert widget.accept(index=0).data.shape == (32, 32)


def test_widget_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, napari_berdiff._qt._widget, napari_berdiff._qt._sample_data, "
            "napari_berdiff._nifti_io; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_model_summary_shows_the_headline_metrics():
    from napari_berdiff._qt._model_panel import _metrics_line

    metrics = {"heldout_phantoms": {"model": {"ged2": 0.1691, "ged2_sem": 0.018, "hm_iou": 0.686,
                                              "soft_dice": 0.809, "n_items": 100},
                                    "oracle": {"ged2": 0.02}}}
    assert _metrics_line(metrics) == (
        "GED² 0.169 · HM-IoU 0.686 · soft Dice 0.809 (heldout phantoms, 100 images)")
    assert _metrics_line({"dice": 0.5, "dice_sem": 0.1}) == "dice 0.5"
    refiner = {"heldout_phantoms": {
        "prior_dice": {"mean": 0.6392, "sem": 0.02, "n": 100},
        "refined_dice_samples": {"mean": 0.7087, "sem": 0.02, "n": 100},
        "prior_hd95": {"mean": 4.703, "n": 100},
        "refined_hd95_mean_mask": {"mean": 2.1026, "n": 98}}}
    assert _metrics_line(refiner) == ("prior → refined: Dice 0.639 → 0.709 · HD95 4.7 → 2.1 "
                                      "(heldout phantoms, 100 images)")


def test_model_summary_names_the_sampler_settings():
    from napari_berdiff._qt._model_panel import summary_html
    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.networks import CondOnceConfig, ConditionOnceNet

    tiny = {"model_channels": 8, "encoder_channels": 8, "channel_mult": (1, 2)}
    net = ConditionOnceNet(CondOnceConfig(**tiny, output_activation="none"))
    gauss = DiffusionModel(net, DiffusionConfig(kind="gaussian", timesteps=100, schedule="linear",
                                                default_steps=10, sampler="ddpm"))
    assert "10 DDPM steps by default" in summary_html(gauss)
    net_b = ConditionOnceNet(CondOnceConfig(**tiny))
    bern = DiffusionModel(net_b, DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=10))
    assert "· 10 steps by default" in summary_html(bern)
    assert "correlated" not in summary_html(bern)
    corr = DiffusionModel(net_b, DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=10,
                                                 draw_correlation=0.9))
    assert "10 steps by default · correlated draws (ρ = 0.9)" in summary_html(corr)
    assert "sharpened" not in summary_html(bern)
    sharp = DiffusionModel(net_b, DiffusionConfig(kind="bernoulli", timesteps=100,
                                                  default_steps=10, temperature=0.25))
    assert "10 steps by default · sharpened steps (temperature 0.25)" in summary_html(sharp)


def test_an_image_unlike_the_training_data_is_sampled_with_a_warning(docked, qtbot, notes):
    pydicom_data = pytest.importorskip("pydicom.data")
    from napari_berdiff.distribution import intensity_stats
    from napari_berdiff.imageio import read_image
    from napari_berdiff.model import normalise_image

    viewer, widget = docked
    model = toy_model(steps=2)
    model.metadata["data"]["intensity_stats"] = intensity_stats(
        [normalise_image(blob(seed=s, centre=(10 + s % 12, 20 - s % 9))[None], None)
         for s in range(40)])
    widget.set_model(model, "toy")
    viewer.add_image(blob(seed=99), name="like")
    outcome = run_and_wait(qtbot, widget)
    assert outcome.steps_done == 2
    assert not [w for w in notes("warning") if "unlikely to be meaningful" in w[1]]
    assert "unlike the model's training data" not in widget.sampling.status.text()

    mr, _ = read_image(pydicom_data.get_testdata_file("MR_small.dcm"))
    viewer.layers.clear()
    viewer.add_image(mr, name="mr")
    outcome = run_and_wait(qtbot, widget)
    assert outcome.steps_done == 2  # sampled all the same
    warned = [w for w in notes("warning") if "unlikely to be meaningful" in w[1]]
    assert len(warned) == 1 and "Sampling anyway" in warned[0][1]
    assert "unlike the model's training data" in widget.sampling.status.text()


def test_a_layer_scale_resamples_to_the_models_spacing_and_back(docked, qtbot):
    from napari_berdiff.spacing import sample_at_spacing

    viewer, widget = docked
    model = toy_model(steps=3)
    model.metadata["data"]["spacing"] = [1.0, 1.0]
    widget.set_model(model, "toy")
    image = blob(64, 64, centre=(20, 40), radius=12, seed=3)
    viewer.add_image(image, name="img", scale=(0.5, 0.5))  # 0.5 mm pixels, the model's 1 mm
    widget.sampling.n_spin.setValue(3)
    widget.sampling.seed_spin.setValue(5)
    seen = []
    model_sample = model.sample

    def spy(img, *a, **k):
        seen.append(np.asarray(img).shape[-2:])
        return model_sample(img, *a, **k)

    model.sample = spy
    outcome = run_and_wait(qtbot, widget)
    assert outcome.steps_done == 3
    assert seen == [(32, 32)]  # sampled at the model's spacing
    samples = _layer(viewer, SAMPLES)
    assert samples.data.shape == (3, 64, 64)  # and shown on the image's grid
    model.sample = model_sample
    ref = sample_at_spacing(model, image, (0.5, 0.5), n=3, steps=3, seed=5)
    np.testing.assert_array_equal(samples.data, ref.masks)
    np.testing.assert_allclose(_layer(viewer, PROBS).data, ref.probs, atol=1e-6)


def test_a_cdal_run_streams_its_few_steps_and_offers_the_majority_vote(docked, qtbot):
    """A cDAL model (T = 3): the steps box is fixed at 3 and the summary says so; the run
    streams its 3 frames, fills the heatmaps with what the engine gives for the same seed,
    and the majority vote is the consensus offered."""
    import torch

    from napari_berdiff._qt._model_panel import summary_html
    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.networks import NCSNppConfig, NCSNppGenerator

    viewer, widget = docked
    image = blob(seed=4)
    viewer.add_image(image, name="img")
    torch.manual_seed(0)
    net = NCSNppGenerator(NCSNppConfig(image_size=32, nf=32, ch_mult=(1, 2), num_res_blocks=1,
                                       attn_resolutions=(16,), nz=8, z_emb_dim=16, n_mlp=1,
                                       cond_enc_layers=1, cond_enc_num_res_blocks=1))
    with torch.no_grad():  # a random network whose x̂0 is not saturated by tanh
        net.conv_out.weight.mul_(0.1)
    diffusion = DiffusionConfig(kind="cdal", timesteps=3, schedule="vp", prediction="x0",
                                default_steps=3)
    model = DiffusionModel(net, diffusion, {"kind": "cdal", "name": "tiny-cdal"})
    widget.set_model(model, "tiny-cdal")
    steps = widget.sampling.steps_spin
    assert (steps.minimum(), steps.maximum(), steps.value()) == (3, 3, 3)
    assert "all of its chain" in summary_html(model) and "majority vote" in summary_html(model)
    assert "stratified" not in summary_html(model)
    stratified = DiffusionModel(net, diffusion.replace(latent_draw="stratified"),
                                {"kind": "cdal", "name": "tiny-cdal"})
    assert "stratified over the samples" in summary_html(stratified)
    _settings(widget, n=4, seed=3)
    frames = []
    widget.frame_pushed.connect(lambda u: frames.append(u.step))
    outcome = run_and_wait(qtbot, widget)
    assert not outcome.cancelled and outcome.steps_done == 3
    assert 2 <= len(frames) <= 3 and frames[-1] == 2
    ref = model.sample_all(image, n=4, seed=3)
    np.testing.assert_array_equal(_layer(viewer, "cDAL samples").data, ref.masks)
    np.testing.assert_allclose(_layer(viewer, "frequency").data, ref.maps["frequency"], atol=1e-6)
    assert _layer(viewer, "entropy").data.max() > 0
    assert widget.results.consensus_threshold() is None  # the majority vote


def test_all_slices_runs_several_slices_per_network_call_and_fills_every_slice(docked,
                                                                               qtbot):
    viewer, widget = docked
    vol = np.stack([blob(16, 16, seed=s, radius=3 + s % 4) for s in range(9)])
    viewer.add_image(vol, name="vol")
    model = tiny_unet_model(steps=2, size=16)
    predict, rows = model.net.predict, []

    def counted(x_t, *args, **kw):
        rows.append(int(x_t.shape[0]))
        return predict(x_t, *args, **kw)

    model.net.predict = counted
    widget.set_model(model, "tiny")
    _settings(widget, n=3, seed=5)
    widget.sampling.set_volume_mode("volume")
    outcome = run_and_wait(qtbot, widget)
    assert outcome.slices_done == 9 and not outcome.cancelled
    assert max(rows) == 4 * 3  # 4 slices x 3 samples in one call
    assert len(rows) == 2 * 3  # batches [1], [4], [4], two steps each
    samples, probs = _layer(viewer, SAMPLES), _layer(viewer, PROBS)
    assert samples.data.shape == (3, 9, 16, 16) and probs.data.shape == (3, 9, 16, 16)
    model.net.predict = predict
    for z in range(9):
        ref = model.sample_all(vol[z], n=3, steps=2, seed=5 + z)
        np.testing.assert_array_equal(samples.data[:, z], ref.masks)
        np.testing.assert_allclose(probs.data[:, z], ref.probs, atol=1e-6)
        np.testing.assert_allclose(_layer(viewer, "variance").data[z], ref.maps["variance"],
                                   atol=1e-6)
