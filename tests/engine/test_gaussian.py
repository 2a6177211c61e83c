"""The Gaussian kernel: forward process, DDIM consistency, DDPM posterior by conditioning."""

import math

import pytest
import torch

from napari_berdiff.diffusion import DiffusionConfig, GaussianKernel


def make(**kw):
    return GaussianKernel(DiffusionConfig(kind="gaussian", schedule="linear", **kw),
                          clip_denoised=False)


def test_ddim_with_exact_noise_keeps_the_trajectory():
    k = make()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g)
    eps = torch.randn(3, 1, 4, 4, generator=g)
    t, s = 700, 300
    x_t = k.q_sample(x0, torch.tensor([t]), eps)
    x0_hat = k.predict_x0(eps, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)
    x_s = k.ddim_step(x_t, x0_hat, t, s, torch.zeros_like(x0))
    torch.testing.assert_close(x_s, k.q_sample(x0, torch.tensor([s]), eps), atol=1e-4, rtol=0)


def test_ddpm_step_is_the_gaussian_posterior_of_the_jump():
    k = make()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    t, s = 600, 450
    ab_t, ab_s = k.schedule.alpha_bar(t), k.schedule.alpha_bar(s)
    # x_s | x0 ~ N(√ab_s x0, 1-ab_s); x_t | x_s ~ N(√(ab_t/ab_s) x_s, 1-ab_t/ab_s)
    a = ab_t / ab_s
    prec = 1 / (1 - ab_s) + a / (1 - a)
    mean = (math.sqrt(ab_s) * x0 / (1 - ab_s) + math.sqrt(a) * x_t / (1 - a)) / prec
    got_mean = k.ddpm_step(x_t, None, x0, t, s, torch.zeros_like(x0))
    torch.testing.assert_close(got_mean, mean)
    one = torch.ones_like(x0)
    got_sd = k.ddpm_step(x_t, None, x0, t, s, one) - got_mean
    torch.testing.assert_close(got_sd, one * math.sqrt(1 / prec))
    # Learned range: v = -1 gives the posterior variance, v = +1 gives β of the jump.
    lo = k.ddpm_step(x_t, -one, x0, t, s, one) - got_mean
    hi = k.ddpm_step(x_t, one, x0, t, s, one) - got_mean
    torch.testing.assert_close(lo, one * math.sqrt(1 / prec))
    torch.testing.assert_close(hi, one * math.sqrt(1 - a))


def test_learned_sigma_splits_two_channels():
    k = make(learn_sigma=True)
    out = torch.randn(2, 2, 4, 4)
    eps, v = k.split_output(out)
    assert eps.shape == (2, 1, 4, 4) and v.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="even number"):
        k.split_output(torch.randn(2, 3, 4, 4))


def test_last_step_returns_x0():
    k = make(sampler="ddpm")
    x_t = torch.randn(1, 1, 2, 2)
    x_s, x0 = k.denoise(x_t, torch.zeros(1, 1, 2, 2), 0, -1, None)
    torch.testing.assert_close(x_s, x0)
    torch.testing.assert_close(x0, x_t / math.sqrt(k.schedule.alpha_bar(0)))


def test_loss_is_zero_for_exact_noise():
    k = make()
    noise = torch.randn(2, 1, 4, 4)
    out = k.loss(noise, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]),
                 noise)
    assert out["loss"].abs().max().item() == 0.0


def test_gaussian_config_rejects_x0_prediction():
    with pytest.raises(ValueError, match="prediction='eps'"):
        DiffusionConfig(kind="gaussian", prediction="x0")
