"""What users see (issue 25): names, labels, colours, the status, guarded buttons, the
reference on its own layers — driven as a user drives the widget."""

from __future__ import annotations

import re

import numpy as np
import torch

from napari_berdiff._qt._layers import (
    PROBS,
    REFERENCE_COLORS,
    SAMPLE_COLOR,
    SAMPLES,
)
from napari_berdiff._qt._reference_view import reader_layer_name
from napari_berdiff._qt._sampling_panel import NO_MODEL_HINT
from napari_berdiff._qt._status import marked_text

from .conftest import blob, run_and_wait, toy_model


def _settings(widget, n=4, seed=7):
    widget.sampling.n_spin.setValue(n)
    widget.sampling.seed_spin.setValue(seed)
    widget.sampling.interval_spin.setValue(0)


def _rgba(colormap, value=1):
    return np.asarray(colormap.map(np.array([value]))).reshape(-1)[:3]


def _hex_rgb(hex_color):
    return np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])


def test_sample_is_disabled_until_a_model_is_loaded(docked, qtbot):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    btn = widget.sampling.sample_btn
    assert not btn.isEnabled() and btn.toolTip() == NO_MODEL_HINT
    assert widget.sampling.status.text() == NO_MODEL_HINT
    widget.set_model(toy_model(steps=2), "toy")
    assert btn.isEnabled() and widget.sampling.status.text() == ""
    _settings(widget)
    run_and_wait(qtbot, widget)
    assert btn.isEnabled()  # and it stays so after a run


def test_layers_and_axes_are_named_after_the_run(docked, qtbot):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    widget.set_model(toy_model(steps=2), "toy")
    _settings(widget)
    run_and_wait(qtbot, widget)
    names = [lay.name for lay in viewer.layers]
    assert SAMPLES == "BerDiff samples" and SAMPLES in names
    assert PROBS == "mean probability" and PROBS in names
    assert not any("x̂0" in n or n.startswith("samples") for n in names)
    assert viewer.dims.axis_labels[0] == "sample"
    # every heatmap carries its legend (shown with the layer)
    assert all(viewer.layers[k].colorbar.visible
               for k in ("frequency", "variance", "entropy", PROBS))
    # samples outline in Okabe–Ito orange, not napari's default colour of label 1
    np.testing.assert_allclose(_rgba(viewer.layers[SAMPLES].colormap), _hex_rgb(SAMPLE_COLOR),
                               atol=1e-3)


def test_a_volume_run_labels_sample_and_slice_and_counts_per_slice(docked, qtbot):
    viewer, widget = docked
    vol = np.stack([blob(24, 24, seed=s, radius=3 + 3 * s) for s in range(3)])
    vol[0] = 0.2  # an empty slice: no sample marks anything there
    viewer.add_image(vol, name="vol")
    widget.set_model(toy_model(steps=2, size=24), "toy")
    _settings(widget, n=5, seed=3)
    widget.sampling.set_volume_mode("volume")
    run_and_wait(qtbot, widget)
    assert tuple(viewer.dims.axis_labels) == ("sample", "slice", "y", "x")
    samples = viewer.layers[SAMPLES].data > 0
    per_slice = [int(samples[:, z].reshape(5, -1).any(1).sum()) for z in range(3)]
    status = widget.sampling.status.text()
    assert status.startswith("Done: 5 samples × 2 steps × 3 slices")
    assert per_slice[0] == 0 and per_slice[2] > 0  # it differs, so the status is per slice
    told = {}
    for a, b, c in re.findall(r"slices? (\d+)(?:–(\d+))?: (\d+)", status):
        for z in range(int(a), int(b or a) + 1):
            told[z] = int(c)
    assert told == dict(enumerate(per_slice))  # what browsing the slices shows


def test_marked_text_per_slice():
    s = np.zeros((4, 5, 2, 2), np.uint8)
    s[:2, 1:3, 0, 0] = 1   # slices 1–2: 2 of 4
    s[:, 3, 1, 1] = 1      # slice 3: 4 of 4
    assert marked_text(s) == ("Samples (of 4) marking a lesion, from 0 to 4 per slice: "
                              "slice 0: 0 · slices 1–2: 2 · slice 3: 4 · slice 4: 0")
    same = np.ones((3, 2, 2, 2), np.uint8)
    assert marked_text(same) == "3 of 3 samples mark a lesion on every slice"
    flat = np.zeros((3, 4, 4), np.uint8)
    flat[1, 0, 0] = 1
    assert marked_text(flat) == "1 of 3 samples mark a lesion"


def test_accepting_an_empty_sample_needs_a_second_press(docked, qtbot, notes):
    viewer, widget = docked
    viewer.add_image(blob(), name="img")
    model = toy_model(steps=2)
    model.net.predict = lambda x_t, t, cond: torch.zeros_like(x_t, dtype=torch.float32)
    widget.set_model(model, "toy")
    _settings(widget, n=3)
    run_and_wait(qtbot, widget)
    assert not viewer.layers[SAMPLES].data.any()
    mask = viewer.add_labels(np.zeros((32, 32), np.uint8), name="mask")
    mask.data[10:20, 10:20] = 1
    widget.results.target_combo.set_layer(mask)
    widget.results.accept_btn.click()  # first press: refused, with the reason
    assert mask.data[10:20, 10:20].all()
    warn = notes("warning")
    assert warn and "marks nothing" in warn[-1][1] and "again" in warn[-1][1]
    widget.results.consensus_btn.click()  # another empty mask: its own first press
    assert mask.data[10:20, 10:20].all()
    widget.results.consensus_btn.click()  # the second press accepts it
    assert not mask.data.any()
    mask.undo()
    assert mask.data[10:20, 10:20].all()


def test_the_model_summary_shows_the_training_data_in_full(docked):
    _, widget = docked
    text = ("2000 synthetic CT-like phantoms with four simulated annotators each, lesions of "
            "5–20 px radius, noise σ 0.05–0.2, held out: seeds 9000–9099")
    model = toy_model(steps=2)
    model.data["description"] = text
    widget.set_model(model, "toy")
    shown = widget.model_panel.summary.text()
    assert f"Trained on: 32×32, 1 ch. {text}" in shown.replace("&#x27;", "'")
    assert "…" not in shown


def test_the_reference_keeps_its_own_layers_beside_every_sample(docked, qtbot):
    viewer, widget = docked
    viewer.add_image(blob(seed=2), name="img")
    yy, xx = np.mgrid[:32, :32]
    annot = np.stack([((yy - 16) ** 2 + (xx - 16) ** 2 < r**2) for r in (6, 7, 8, 9)])
    ref = viewer.add_labels(annot.astype(np.uint8), name="annotators")
    widget.set_model(toy_model(steps=2), "toy")
    _settings(widget, n=6)
    widget.metrics.ref_combo.set_layer(ref)
    run_and_wait(qtbot, widget)
    readers = [viewer.layers[reader_layer_name(ref, k)] for k in range(4)]
    assert not ref.visible  # the stack stays the metrics' reference, hidden
    assert widget.last_metrics["k"] == 4
    for k, lay in enumerate(readers):
        assert lay.ndim == 2 and lay.visible and lay.contour == 1  # no sample axis
        np.testing.assert_array_equal(lay.data > 0, annot[k])
        np.testing.assert_allclose(_rgba(lay.colormap), _hex_rgb(REFERENCE_COLORS[k]), atol=1e-3)
        assert not np.allclose(_rgba(lay.colormap), _hex_rgb(SAMPLE_COLOR), atol=0.05)
    widget.show_sample(5)  # past the last annotator: the reference is still drawn
    viewer.layers[SAMPLES].refresh()
    for lay in readers:
        assert np.asarray(lay._slice.image.raw).any()
    # the readers are not offered as reference or target
    assert readers[0] not in widget.metrics.ref_combo.candidates()
    assert readers[0] not in widget.results.target_combo.candidates()
    # a metrics refresh does not lay them out twice
    widget.compute_metrics(quiet=True)
    assert sum(lay.name.startswith("annotators: reader") for lay in viewer.layers) == 4
