"""Volumes sampled several slices per network call give each slice its own run's samples."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_berdiff import load_model
from napari_berdiff.diffusion import (BernoulliKernel, DiffusionConfig, run_to_end,
                                      sample_stream, timestep_subsequence)
from napari_berdiff.diffusion.sampler import (MemoryBudgetError, SliceInput, plan_memory,
                                              stream_images)
from napari_berdiff.diffusion.volume import CPU_MAX_ROWS, batch_sizes, plan_slices

from .ckpt_helpers import one_torch_thread, tiny_model  # noqa: F401 - the fixture
from .toys import TinyConvNet

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "berdiff-phantom-64.safetensors"


def _volume(slices: int = 5, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    vol = [0.2 + 0.6 * ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (3 + s) ** 2)
           + 0.05 * rng.standard_normal((size, size)) for s in range(slices)]
    return np.stack(vol).astype(np.float32)


class CountingNet(torch.nn.Module):
    """Wraps a network and records the batch size of every ``predict`` call."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.batches = net, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)

    def encode(self, image):
        return self.net.encode(image)

    def predict(self, x_t, t, cond, *extra, **kw):
        self.batches.append(int(x_t.shape[0]))
        return self.net.predict(x_t, t, cond, *extra, **kw)


def _same(batched, single) -> None:
    np.testing.assert_array_equal(batched.states, single.states)
    np.testing.assert_allclose(batched.x0_prob, single.x0_prob, rtol=0, atol=1e-6)


@pytest.mark.parametrize("first_alone", [True, False])
def test_batched_slices_equal_slice_by_slice_runs(first_alone):
    model = tiny_model()
    vol = _volume(5)
    seeds = [7 + z for z in range(5)]
    counting = CountingNet(model.net)
    model.net = counting
    stream = model.sample_slices(list(vol), n=3, steps=3, seeds=seeds, max_slices=4,
                                 first_alone=first_alone)
    frames = {z: [] for z in range(5)}
    for sf in stream:
        frames[sf.slice_index].append(sf.frame)
    assert stream.plan.slices == 4 and max(counting.batches) == 12  # 4 slices x 3 samples
    assert [r.steps_done for r in stream.results] == [3] * 5 and not stream.cancelled
    for z in range(5):
        alone = model.sample(vol[z], 3, 3, seeds[z])
        singles = list(alone)
        assert len(frames[z]) == len(singles) == 3
        for b, s in zip(frames[z], singles):
            _same(b, s)
        np.testing.assert_array_equal(stream.results[z].masks, alone.result.masks)
        np.testing.assert_allclose(stream.results[z].probs, alone.result.probs, atol=1e-6)
    # the slices differ from each other (a test that every slice got its own samples)
    assert len({r.masks.tobytes() for r in stream.results}) == 5


def test_chunks_that_straddle_slices_keep_each_slice_its_samples():
    kernel = BernoulliKernel(DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=4))
    net = TinyConvNet()
    vol = _volume(3, size=12)
    inputs = [SliceInput(np.ascontiguousarray(v[None]), 40 + z) for z, v in enumerate(vol)]
    core = stream_images(net, kernel, inputs, 4, timestep_subsequence(4, 100),
                         (0, 0, 12, 12), torch.device("cpu"), 5, None, False, 0.0)
    steps = list(core)  # chunks of 5 rows: [0:5] holds slices 0-1, [5:10] slices 1-2
    assert len(steps) == 4
    for z in range(3):
        single = list(sample_stream(net, kernel, vol[z], n=4, steps=4, seed=40 + z,
                                    device="cpu"))
        for frames, s in zip(steps, single):
            _same(frames[z], s)


@pytest.mark.skipif(not BUNDLED.exists(), reason="the bundled model is not in models/")
def test_bundled_model_batches_exactly_with_readers_and_unmarked_samples():
    """The default network: a list condition, readers, and a presence head whose unmarked
    samples skip the network (the rows a batched call keeps must take their own slice's
    condition)."""
    model = load_model(BUNDLED)
    counting = CountingNet(model.net)
    model.net = counting
    noise = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    vol = [_volume(1, size=32, seed=2)[0], *noise]  # the noise: presence about 0.65
    stream = model.sample_slices(vol, n=4, steps=2, seeds=[1, 2, 3], first_alone=False)
    assert len(list(stream)) == 6
    assert counting.batches[0] < 12  # some samples were drawn unmarked
    model.net = counting.net
    for z in range(3):
        alone = run_to_end(model.sample(vol[z], 4, 2, z + 1))
        np.testing.assert_array_equal(stream.results[z].masks, alone.masks)
        np.testing.assert_allclose(stream.results[z].probs, alone.probs, atol=1e-6)
        np.testing.assert_array_equal(stream.results[z].readers, alone.readers)
        assert stream.results[z].presence == alone.presence < 1


def test_cancel_stops_within_a_batch_and_between_batches():
    model = tiny_model()
    counting = CountingNet(model.net)
    model.net = counting
    vol = _volume(5)
    cancel = threading.Event()
    stream = model.sample_slices(list(vol), n=2, steps=3, seeds=range(5), max_slices=2,
                                 cancel=cancel)
    seen = []
    for sf in stream:  # batches: [0], [1, 2], [3, 4]
        seen.append((sf.slice_index, sf.frame.step))
        if sf.slice_index == 2 and sf.frame.step == 0:
            cancel.set()
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    assert stream.cancelled and len(stream.results) == 3
    assert [r.cancelled for r in stream.results] == [False, True, True]
    assert [r.steps_done for r in stream.results] == [3, 1, 1]
    assert len(counting.batches) == 4  # 3 steps of slice 0, one of slices 1-2, no more

    cancel2 = threading.Event()
    counting.batches.clear()
    stream = model.sample_slices(list(vol), n=2, steps=3, seeds=range(5), max_slices=2,
                                 cancel=cancel2)
    for sf in stream:
        if sf.frame.final and sf.slice_index == 0:
            cancel2.set()  # after the first batch's last step: no further batch starts
    assert len(stream.results) == 1 and stream.cancelled and len(counting.batches) == 3


def test_slices_per_batch_respect_a_small_memory_budget():
    net = tiny_model().net
    n, h, w, slices = 16, 64, 64, 8
    big = 64 * 2**30
    totals = {k: plan_memory(net, k * n, 1, h, w, None, None, available=big, images=k).total
              for k in range(1, slices + 1)}
    assert all(totals[k] < totals[k + 1] for k in range(1, slices))
    budget_mb = (totals[3] + totals[4]) / 2 / 2**20  # room for 3 slices in one call, not 4
    plan = plan_slices(net, n, 1, h, w, slices, max_slices=8, memory_budget_mb=budget_mb,
                       available=big)
    assert plan.slices == 3 and plan.chunk >= 3 * n
    assert plan.memory.total <= budget_mb * 2**20
    # the brute-force answer: the largest k whose k*n rows go through in one call
    fits = [k for k in range(2, slices + 1)
            if plan_memory(net, k * n, 1, h, w, None, budget_mb, available=big,
                           images=k).chunk >= k * n]
    assert max(fits) == 3
    # the cap and the slice count bound it too; a budget for one slice batches nothing
    assert plan_slices(net, n, 1, h, w, 2, 8, None, budget_mb, available=big).slices == 2
    assert plan_slices(net, n, 1, h, w, slices, 2, None, budget_mb, available=big).slices == 2
    one = plan_slices(net, n, 1, h, w, slices, 8, None, totals[1] / 2**20 + 0.5,
                      available=big)
    assert one.slices == 1
    with pytest.raises(MemoryBudgetError):
        plan_slices(net, n, 1, h, w, slices, 8, None, 1, available=big)


def test_a_run_under_the_budget_never_calls_the_network_on_more_rows():
    model = tiny_model()
    counting = CountingNet(model.net)
    model.net = counting
    vol = _volume(6)
    big = 64 * 2**30
    two = plan_memory(counting, 2 * 4, 1, 16, 16, None, None, available=big, images=2).total
    three = plan_memory(counting, 3 * 4, 1, 16, 16, None, None, available=big, images=3).total
    stream = model.sample_slices(list(vol), n=4, steps=2, seeds=range(6), max_slices=6,
                                 memory_budget_mb=(two + three) / 2 / 2**20)
    list(stream)
    assert stream.plan.slices == 2 and max(counting.batches) == 8
    assert len(stream.results) == 6 and not stream.cancelled


def test_batch_sizes():
    assert batch_sizes(32, 4) == [1] + [4] * 7 + [3]
    assert batch_sizes(32, 4, first_alone=False) == [4] * 8
    assert batch_sizes(3, 1) == [1, 1, 1]
    assert batch_sizes(1, 4) == [1]
    assert batch_sizes(0, 4) == []


def test_mismatched_slices_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="one entry per slice"):
        model.sample_slices(list(_volume(3)), n=2, seeds=[1, 2])
    vol = [np.zeros((16, 16), np.float32), np.zeros((16, 24), np.float32)]
    stream = model.sample_slices(vol, n=2, steps=2, seeds=[1, 2])  # slice 1 is read lazily
    first = [next(stream) for _ in range(2)]  # slice 0 alone streams its steps first
    assert [f.slice_index for f in first] == [0, 0]
    with pytest.raises(ValueError, match="one shape"):
        next(stream)


def test_on_the_cpu_batches_stop_at_the_row_cap():
    model = tiny_model()
    vol = list(_volume(6))
    auto = model.sample_slices(vol, n=8, steps=1, seeds=range(6), max_slices=4)
    assert auto.plan.slices == CPU_MAX_ROWS // 8 == 2
    assert model.sample_slices(vol, n=8, steps=1, seeds=range(6), max_slices=4,
                               max_rows=None).plan.slices == 4
    assert model.sample_slices(vol, n=8, steps=1, seeds=range(6), max_slices=4,
                               max_rows=8).plan.slices == 1


def test_slices_are_prepared_when_their_batch_starts():
    """The first frame does not wait for the whole volume to be prepared."""
    model = tiny_model()
    prepared = []
    prepare = model.prepare

    def counting_prepare(image, *args, **kwargs):
        prepared.append(float(np.asarray(image).mean()))
        return prepare(image, *args, **kwargs)

    model.prepare = counting_prepare
    vol = _volume(9)
    stream = model.sample_slices(list(vol), n=2, steps=3, seeds=range(9), max_slices=4)
    assert stream.plan.slices == 4
    first = next(stream)
    assert first.slice_index == 0 and len(prepared) == 1  # slice 0 runs alone first
    for _ in range(2):
        next(stream)  # slice 0's other steps
    assert len(prepared) == 1
    assert next(stream).batch == (1, 4) and len(prepared) == 5  # the next batch, prepared
    rest = list(stream)
    assert len(prepared) == 9 and len(rest) == 3 * 9 - 4
    np.testing.assert_allclose(prepared, vol.reshape(9, -1).mean(1), rtol=1e-6)
    assert len(stream.results) == 9
