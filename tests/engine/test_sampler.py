"""The streaming sampler with stand-in networks: frames, seeds, cancel, chunking, bad input."""

import threading

import numpy as np
import pytest
import torch

from napari_berdiff.diffusion import (
    BernoulliKernel,
    DiffusionConfig,
    GaussianKernel,
    run_to_end,
    sample_stream,
)
from napari_berdiff.diffusion.sampler import choose_chunk

from .toys import FixedX0Net, PerfectEpsNet, TinyConvNet


@pytest.fixture
def bern():
    return BernoulliKernel(DiffusionConfig(kind="bernoulli", timesteps=1000, default_steps=10))


@pytest.fixture(params=[0.0, 0.9], ids=["independent", "correlated"])
def bern_draws(request):
    """The Bernoulli kernel with independent and with correlated draws."""
    return BernoulliKernel(DiffusionConfig(kind="bernoulli", timesteps=1000, default_steps=10,
                                           draw_correlation=request.param))


@pytest.fixture
def image():
    return np.random.default_rng(0).random((12, 10)).astype(np.float32)


def test_one_frame_per_visited_step(bern, image):
    frames = list(sample_stream(TinyConvNet(), bern, image, n=3, steps="ddimuni10", seed=0,
                                device="cpu"))
    assert [f.t for f in frames] == list(range(900, -1, -100))
    assert [f.step for f in frames] == list(range(10))
    assert frames[-1].final and not frames[0].final
    f = frames[3]
    assert f.states.shape == (3, 12, 10) and f.states.dtype == np.uint8
    assert f.x0_prob.shape == (3, 12, 10) and f.x0_prob.dtype == np.float32
    assert set(np.unique(f.states)) <= {0, 1}
    assert {"frequency", "variance", "entropy", "mutual_information"} <= set(f.maps)
    np.testing.assert_allclose(f.maps["frequency"], f.masks.mean(0), atol=1e-6)


def test_result_is_returned_with_timings(bern, image):
    res = run_to_end(sample_stream(TinyConvNet(), bern, image, n=4, steps=5, seed=1,
                                   device="cpu"))
    assert res.probs.shape == (4, 12, 10) and res.masks.shape == (4, 12, 10)
    assert res.steps_done == 5 and not res.cancelled and res.device == "cpu"
    np.testing.assert_array_equal(res.masks, (res.probs > 0.5).astype(np.uint8))
    t = res.timings
    assert 0 < t["network_s"] <= t["total_s"] and t["first_frame_s"] <= t["total_s"]
    assert 0 < t["encode_s"] < t["network_s"]  # the encoding counts as network time
    assert set(res.maps) >= {"frequency", "variance", "entropy"}


def test_final_probabilities_are_the_networks_x0(image):
    """An x0-mode net that always predicts the same map must be returned exactly."""
    k = BernoulliKernel(DiffusionConfig(kind="bernoulli", prediction="x0"))
    target = torch.rand(1, 1, 12, 10, generator=torch.Generator().manual_seed(3))
    res = run_to_end(sample_stream(FixedX0Net(target), k, image, n=2, steps=4, device="cpu"))
    np.testing.assert_allclose(res.probs, np.repeat(target[:, 0].numpy(), 2, 0), atol=1e-7)


def test_gaussian_kernel_runs_through_the_same_sampler(image):
    x0 = (torch.rand(1, 1, 12, 10, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    for sampler in ("ddim", "ddpm"):
        k = GaussianKernel(DiffusionConfig(kind="gaussian", schedule="linear", sampler=sampler))
        net = PerfectEpsNet(x0, k.schedule.alpha_bars)
        frames = list(sample_stream(net, k, image, n=3, steps=8, seed=0, device="cpu"))
        assert len(frames) == 8
        # With the exact noise the reverse process lands on x0.
        np.testing.assert_allclose(frames[-1].x0_prob, np.repeat(x0[:, 0].numpy(), 3, 0),
                                   atol=1e-3)
        assert set(np.unique(frames[-1].masks)) <= {0, 1}


def test_same_seed_same_samples_other_seed_differs(bern_draws, image):
    def run(seed):
        return run_to_end(sample_stream(TinyConvNet(), bern_draws, image, n=4, steps=6, seed=seed,
                                        device="cpu"))

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.probs, c.probs)


def test_chunked_and_unchunked_runs_agree(bern_draws, image):
    net = TinyConvNet()
    whole = run_to_end(sample_stream(net, bern_draws, image, n=7, steps=6, seed=2, device="cpu"))
    parts = run_to_end(sample_stream(net, bern_draws, image, n=7, steps=6, seed=2, device="cpu",
                                     max_batch=3))
    assert whole.chunk_size == 7 and parts.chunk_size == 3
    np.testing.assert_allclose(parts.probs, whole.probs, atol=1e-6)
    np.testing.assert_array_equal(parts.masks, whole.masks)


def test_memory_budget_chunks_the_batch():
    class Cfg:
        model_channels, channel_mult, num_res_blocks = 32, (1, 2), 1

    class Net:
        config = Cfg()

    assert choose_chunk(Net(), 16, 128, 128, None, None) == 16
    small = choose_chunk(Net(), 16, 128, 128, None, 20)
    assert 1 <= small < 16
    assert choose_chunk(Net(), 16, 128, 128, 4, 10_000) == 4


@pytest.mark.parametrize("event", [True, False])
def test_cancel_stops_within_one_step(bern, image, event):
    flag = threading.Event()
    cancel = flag if event else flag.is_set
    net = TinyConvNet()
    calls = []
    orig = net.predict
    net.predict = lambda *a: calls.append(1) or orig(*a)
    stream = sample_stream(net, bern, image, n=2, steps=10, seed=0, device="cpu", cancel=cancel)
    seen = []
    try:
        while True:
            f = next(stream)
            seen.append(f.step)
            if f.step == 2:
                flag.set()
    except StopIteration as stop:
        res = stop.value
    assert seen == [0, 1, 2]
    assert len(calls) == 3  # no network call after the cancel
    assert res.cancelled and res.steps_done == 3
    assert res.probs.shape == (2, 12, 10)


def test_cancel_before_first_step_returns_empty_result(bern, image):
    flag = threading.Event()
    flag.set()
    res = run_to_end(sample_stream(TinyConvNet(), bern, image, n=2, steps=3, device="cpu",
                                   cancel=flag))
    assert res.cancelled and res.steps_done == 0 and res.probs is None and res.maps == {}


def test_roi_samples_only_the_box(bern, image):
    res = run_to_end(sample_stream(TinyConvNet(), bern, image, n=2, steps=2, device="cpu",
                                   roi=(2, 3, 10, 8)))
    assert res.probs.shape == (2, 8, 5) and res.roi == (2, 3, 10, 8)


def test_prior_map_starts_the_chain_and_is_cropped(image):
    """A fully trusted prior with a net that predicts it is returned unchanged."""
    k = BernoulliKernel(DiffusionConfig(kind="bernoulli", prediction="x0",
                                        schedule="alpha_bar_linear", timesteps=10,
                                        default_steps=10))
    prior = np.zeros((12, 10), np.float32)
    prior[3:9, 2:7] = 1
    net = FixedX0Net(torch.from_numpy(prior[2:10, 1:8])[None, None])
    frames = list(sample_stream(net, k, image, n=3, prior=prior, roi=(2, 1, 10, 8),
                                device="cpu"))
    for f in frames:
        np.testing.assert_array_equal(f.states, np.repeat(prior[None, 2:10, 1:8], 3, 0))


def test_image_channels_and_3d_inputs(bern):
    rgbish = np.random.default_rng(1).random((3, 8, 8)).astype(np.float32)
    res = run_to_end(sample_stream(TinyConvNet(image_channels=3), bern, rgbish, n=1, steps=2,
                                   device="cpu", image_channels=3))
    assert res.probs.shape == (1, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image=np.zeros((2, 3, 8, 8))), r"2D \(H, W\) or 3D \(C, H, W\)"),
        (dict(image=np.full((8, 8), np.nan)), "NaN"),
        (dict(image=np.zeros((0, 8))), "empty"),
        (dict(image=np.zeros((2, 8, 8)), image_channels=1), "takes 1 image channel"),
        (dict(n=0), "number of samples"),
        (dict(n=2.5), "number of samples"),
        (dict(steps=1001), "exceeds the model's chain length T=1000"),
        (dict(steps="sometimes"), "unrecognised step spec"),
        (dict(roi=(0, 0, 20, 5)), "outside the 8x8 image"),
        (dict(prior=np.full((4, 4), 0.5)), "prior's shape"),
        (dict(prior=np.full((8, 8), 2.0)), r"probabilities in \[0, 1\]"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_input_is_rejected_before_any_work(bern, kwargs, match):
    args = dict(image=np.zeros((8, 8), np.float32), n=2, steps=3, device="cpu")
    args.update(kwargs)
    img = args.pop("image")
    with pytest.raises((ValueError, RuntimeError), match=match):
        sample_stream(TinyConvNet(), bern, img, **args)


def test_gaussian_refuses_a_prior(image):
    k = GaussianKernel(DiffusionConfig(kind="gaussian"))
    with pytest.raises(ValueError, match="only to the Bernoulli"):
        sample_stream(TinyConvNet(), k, image, n=1, steps=2, prior=np.zeros((12, 10)),
                      device="cpu")


def test_self_conditioned_net_gets_the_previous_steps_x0(bern_draws, image):
    from .toys import RecordingSelfCondNet

    net = RecordingSelfCondNet()
    stream = sample_stream(net, bern_draws, image, n=3, steps=4, seed=2)
    frames = list(stream)
    assert len(net.seen) == 4
    assert not net.seen[0].any()  # zeros at the first step
    for prev, frame in zip(net.seen[1:], frames[:-1]):
        np.testing.assert_allclose(prev[:, 0].numpy(), frame.x0_prob, atol=1e-6)
    # chunking threads each sample's own x̂0: the same samples, in any number of chunks
    chunked = run_to_end(sample_stream(RecordingSelfCondNet(), bern_draws, image, n=3,
                                       steps=4, seed=2, max_batch=2))
    np.testing.assert_allclose(chunked.probs, stream.result.probs, atol=1e-6)
