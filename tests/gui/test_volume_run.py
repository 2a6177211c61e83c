"""The worker's volume path (no viewer): batched slices, cancel and catch-up updates."""

from __future__ import annotations

import numpy as np

from napari_berdiff._qt._run import Job, run_job

from .conftest import blob, tiny_unet_model


def _drain(gen):
    updates = []
    while True:
        try:
            updates.append(next(gen))
        except StopIteration as stop:
            return updates, stop.value


def test_a_cancelled_volume_run_stops_and_brings_each_started_slice_up_to_date():
    model = tiny_unet_model(steps=4, size=16)
    crops = [blob(16, 16, seed=z)[None] for z in range(7)]
    job = Job(model, crops, list(range(7)), n=2, steps=4, seed=1, interval_s=3600.0,
              threads=1)
    gen = run_job(job)
    updates = []
    while True:
        upd = next(gen)
        updates.append(upd)
        if upd.slice_pos == 4 and upd.step == 1:  # second step of the batch [1..4]
            job.cancel.set()
            break
    rest, outcome = _drain(gen)
    assert outcome.cancelled and outcome.slices_done == 1 and outcome.n_slices == 7
    assert outcome.steps_done == 4 + 4 * 2
    # one catch-up per slice of the cancelled batch, with its step-2 arrays
    assert [(u.slice_pos, u.step, u.catch_up) for u in rest] == [(z, 1, True)
                                                                 for z in range(1, 5)]
    for u in rest:
        ref = model.sample(crops[u.slice_pos], 2, 4, 1 + u.slice_pos)
        frames = [next(ref), next(ref)]
        np.testing.assert_array_equal(u.states, frames[1].states)
    # slices 5 and 6 never started
    assert {u.slice_pos for u in updates + rest} == set(range(5))


def test_a_volume_run_resamples_each_slice_when_its_batch_starts(monkeypatch):
    """The first frames do not wait for every slice to be resampled to the model's grid."""
    import napari_berdiff.spacing as spacing

    model = tiny_unet_model(steps=2, size=16)
    model.data["spacing"] = [1.0, 1.0]
    resampled = []
    real = spacing.to_model_spacing

    def counting(model_, image, *args, **kwargs):
        resampled.append(image)
        return real(model_, image, *args, **kwargs)

    monkeypatch.setattr(spacing, "to_model_spacing", counting)
    crops = [blob(32, 32, seed=z)[None] for z in range(6)]
    job = Job(model, crops, list(range(6)), n=2, steps=2, seed=1, interval_s=0.0, threads=1,
              spacing=(0.5, 0.5))
    gen = run_job(job)
    first = next(gen)
    assert first.slice_pos == 0 and len(resampled) == 1 and resampled[0] is crops[0]
    assert first.states.shape[-2:] == (32, 32)  # mapped back to the crop's own grid
    updates, outcome = _drain(gen)
    assert len(resampled) == 6 and outcome.slices_done == 6
    assert [id(r) for r in resampled] == [id(c) for c in crops]
    # each slice's final arrays are those of that slice run alone (the same resampling)
    last = {u.slice_pos: u for u in [first] + updates if u.final}
    for z in (0, 3):
        alone = Job(model, [crops[z]], [z], n=2, steps=2, seed=1, interval_s=0.0, threads=1,
                    spacing=(0.5, 0.5))
        ref = [u for u in _drain(run_job(alone))[0] if u.final][0]
        assert last[z].states.shape == ref.states.shape == (2, 32, 32)
        np.testing.assert_array_equal(last[z].states, ref.states)
        np.testing.assert_allclose(last[z].probs, ref.probs, atol=1e-6)
