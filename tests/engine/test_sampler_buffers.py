"""Frames keep their own data when the sampler writes chunks into shared buffers."""

import numpy as np
import pytest

from napari_berdiff.diffusion import (BernoulliKernel, DiffusionConfig, GaussianKernel,
                                      sample_stream)

from .toys import TinyConvNet


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("max_batch", [2, 3, 7])
def test_every_kept_frame_matches_the_unchunked_run(kind, max_batch):
    kernel = (BernoulliKernel if kind == "bernoulli" else GaussianKernel)(
        DiffusionConfig(kind=kind, timesteps=100, default_steps=5))
    image = np.random.default_rng(1).random((12, 10)).astype(np.float32)
    net = TinyConvNet()
    whole = list(sample_stream(net, kernel, image, n=7, seed=3, device="cpu", max_batch=None,
                               memory_budget_mb=None))
    parts = list(sample_stream(net, kernel, image, n=7, seed=3, device="cpu",
                               max_batch=max_batch))
    assert len(whole) == len(parts) == 5
    # frames are read only after the whole run: later steps must not overwrite earlier ones
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(a.states, b.states)
        np.testing.assert_allclose(a.x0_prob, b.x0_prob, atol=1e-6)
    assert len({f.x0_prob.tobytes() for f in parts}) > 1
