"""The Bernoulli kernel against brute force (DESIGN §3.2)."""

import itertools

import numpy as np
import pytest
import torch

from napari_berdiff.diffusion import BernoulliKernel, DiffusionConfig


def bern(x, theta):
    """B(x; θ) for x in {0, 1}."""
    return theta if x == 1 else 1.0 - theta


@pytest.fixture
def kernel():
    return BernoulliKernel(DiffusionConfig(kind="bernoulli", timesteps=1000, schedule="cosine"))


def test_posterior_equals_enumerated_bayes_for_random_p_alpha_alphabar():
    rng = np.random.default_rng(0)
    k = BernoulliKernel(DiffusionConfig(kind="bernoulli", timesteps=50, schedule="linear"))
    # Replace the tables with random coefficients: the posterior formula holds for any.
    alpha = rng.uniform(0.01, 0.99, 50)
    abar_prev = rng.uniform(0.0, 1.0, 50)
    k._alpha = torch.from_numpy(alpha)
    k._abar_prev = torch.from_numpy(abar_prev)
    for trial in range(200):
        t = int(rng.integers(50))
        p = float(rng.uniform(0.01, 0.99))
        a, abp = alpha[t], abar_prev[t]
        for x_t, x0 in itertools.product((0, 1), (0, 1)):
            # Bayes: P(x_{t-1}=v | x_t, x0) ∝ q(x_t | x_{t-1}=v) q(x_{t-1}=v | x0)
            w = {
                v: bern(x_t, a * v + (1 - a) * p) * bern(v, abp * x0 + (1 - abp) * p)
                for v in (0, 1)
            }
            expected = w[1] / (w[0] + w[1])
            got = k.posterior(
                torch.tensor([[[[float(x_t)]]]], dtype=torch.float64),
                torch.tensor([[[[float(x0)]]]], dtype=torch.float64),
                torch.tensor([t]),
                p,
            ).item()
            assert got == pytest.approx(expected, abs=1e-12), (trial, x_t, x0)
            # The normaliser is the one-step forward marginal q(x_t | x0).
            abar_t = a * abp
            assert w[0] + w[1] == pytest.approx(bern(x_t, abar_t * x0 + (1 - abar_t) * p))


def test_posterior_takes_per_pixel_prior_maps(kernel):
    g = torch.Generator().manual_seed(1)
    x_t = (torch.rand(4, 1, 5, 5, generator=g) > 0.5).double()
    x0 = (torch.rand(4, 1, 5, 5, generator=g) > 0.5).double()
    p = torch.rand(1, 1, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 100, 500, 999])
    full = kernel.posterior(x_t, x0, t, p)
    for i, j in itertools.product(range(5), range(5)):
        one = kernel.posterior(x_t[:, :, i : i + 1, j : j + 1], x0[:, :, i : i + 1, j : j + 1], t,
                               float(p[0, 0, i, j]))
        torch.testing.assert_close(full[:, :, i : i + 1, j : j + 1], one)


def test_half_prior_reproduces_berdiff_formulas(kernel):
    g = torch.Generator().manual_seed(2)
    x_t = (torch.rand(6, 1, 4, 4, generator=g) > 0.5).double()
    x0 = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64)  # soft x̂0 too
    t = torch.tensor([0, 1, 10, 400, 800, 999])
    a = torch.from_numpy(kernel.schedule.alphas)[t].reshape(-1, 1, 1, 1)
    abp = torch.tensor([kernel.schedule.alpha_bar(int(i) - 1) for i in t]).reshape(-1, 1, 1, 1)
    # BerDiff (p = 1/2): theta1 = [a(1-x_t) + (1-a)/2][abp(1-x0) + (1-abp)/2], theta2 likewise.
    th1 = (a * (1 - x_t) + (1 - a) / 2) * (abp * (1 - x0) + (1 - abp) / 2)
    th2 = (a * x_t + (1 - a) / 2) * (abp * x0 + (1 - abp) / 2)
    torch.testing.assert_close(kernel.posterior(x_t, x0, t, 0.5), th2 / (th1 + th2))
    abar = torch.from_numpy(kernel.schedule.alpha_bars)[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(kernel.q_probs(x0, t, 0.5), abar * x0 + (1 - abar) / 2)


@pytest.mark.parametrize("t, s", [(900, 500), (500, 100), (100, 0)])
def test_accelerated_step_marginal_matches_forward_process(kernel, t, s):
    """Monte Carlo: x_t ~ q(x_t|x0), one accelerated step with x̂0 = x0, must give
    x_s ~ q(x_s|x0). 400k draws per pixel class; tolerance 0.006 is > 5 standard errors."""
    g = torch.Generator().manual_seed(3)
    m = 400_000
    x0 = (torch.arange(m) % 2).double().reshape(m, 1, 1, 1)
    p = 0.3  # a non-trivial prior: it must cancel
    x_t = kernel.q_sample(x0, torch.tensor([t]), p, generator=g)
    mean = kernel.step_probs(x_t, x0, t, s)
    x_s = (torch.rand(mean.shape, generator=g, dtype=mean.dtype) < mean).double()
    target = kernel.q_probs(x0, torch.tensor([s]), p)
    for v in (0, 1):
        sel = x0.flatten() == v
        assert x_s.flatten()[sel].mean().item() == pytest.approx(
            target.flatten()[sel][0].item(), abs=0.006
        )


def test_accelerated_step_mean_stays_a_probability(kernel):
    g = torch.Generator().manual_seed(4)
    x_t = (torch.rand(50, 1, 8, 8, generator=g) > 0.5).float()
    x0_hat = torch.rand(50, 1, 8, 8, generator=g)
    for t, s in [(999, 0), (999, 998), (1, 0)]:
        m = kernel.step_probs(x_t, x0_hat, t, s)
        assert m.min() >= 0 and m.max() <= 1
    with pytest.raises(ValueError, match="backwards"):
        kernel.step_probs(x_t, x0_hat, 5, 5)


def test_eps_mode_recovers_x0_from_flip_probability(kernel):
    x_t = torch.tensor([0.0, 0.0, 1.0, 1.0])
    eps = torch.tensor([0.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(kernel.predict_x0(eps, x_t), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    k0 = BernoulliKernel(DiffusionConfig(kind="bernoulli", prediction="x0"))
    torch.testing.assert_close(k0.predict_x0(eps, x_t), eps)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
@pytest.mark.parametrize("focal", [False, True])
def test_loss_reaches_its_floor_at_a_perfect_prediction(prediction, focal):
    k = BernoulliKernel(DiffusionConfig(kind="bernoulli", prediction=prediction))
    g = torch.Generator().manual_seed(5)
    x0 = (torch.rand(8, 1, 6, 6, generator=g) > 0.5).float()
    t = torch.tensor([0, 0, 3, 50, 200, 500, 900, 999])
    x_t = k.q_sample(x0, t, 0.5, generator=g)
    perfect = k.training_target(x0, x_t)
    floor = k.loss(perfect, x0, x_t, t, focal=focal)
    # A binary x0 has zero entropy: the floor is 0 up to the 1e-7 clamp.
    assert floor["loss"].max().item() < 1e-4
    assert floor["loss"].min().item() >= 0
    for q in (0.5, 0.9):
        off = torch.where(perfect > 0.5, torch.full_like(perfect, q), 1 - torch.full_like(perfect, q))
        worse = k.loss(off, x0, x_t, t, focal=focal)["loss"]
        assert (worse > floor["loss"]).all()


def test_loss_vb_uses_nll_at_t0_in_bits():
    k = BernoulliKernel(DiffusionConfig(kind="bernoulli", prediction="x0"))
    x0 = torch.ones(1, 1, 2, 2)
    pred = torch.full((1, 1, 2, 2), 0.5)
    out = k.loss(pred, x0, x0, torch.tensor([0]))
    assert out["vb"].item() == pytest.approx(1.0, rel=1e-5)  # -log2(1/2)


def test_forward_start_is_bernoulli_of_prior():
    k = BernoulliKernel(DiffusionConfig(kind="bernoulli"))
    g = torch.Generator().manual_seed(6)
    p = torch.linspace(0, 1, 11).reshape(1, 1, 1, 11)
    x = k.init(k.noise((20000, 1, 1, 11), g), p)
    np.testing.assert_allclose(x.mean(0).flatten().numpy(), p.flatten().numpy(), atol=0.015)
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}


def test_kernel_rejects_gaussian_config():
    with pytest.raises(ValueError, match="kind='bernoulli'"):
        BernoulliKernel(DiffusionConfig(kind="gaussian"))


# ---------------------------------------------------------------- correlated draws
def _correlated(rho):
    return BernoulliKernel(DiffusionConfig(kind="bernoulli", prediction="x0",
                                           draw_correlation=rho))


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.95])
def test_correlated_step_keeps_every_pixels_probability(rho):
    """Whatever ρ, P(x_s = 1) per pixel is the step mean σ x_t + (1 − σ) x̂0."""
    k = _correlated(rho)
    g = torch.Generator().manual_seed(1)
    n = 40000
    x0_hat = torch.linspace(0.02, 0.98, 8).reshape(1, 1, 1, 8).expand(n, 1, 2, 8)
    x_t = torch.tensor([0.0, 1.0]).reshape(1, 1, 2, 1).expand(n, 1, 2, 8)
    x_s, _ = k.denoise(x_t, x0_hat, 600, 400, k.noise((n, 1, 2, 8), g))
    expected = k.step_probs(x_t[:1], x0_hat[:1], 600, 400)[0]
    np.testing.assert_allclose(x_s.mean(0).numpy(), expected.numpy(), atol=0.01)
    assert set(torch.unique(x_s).tolist()) <= {0.0, 1.0}


def test_correlated_draws_make_a_sample_agree_with_itself():
    """With x̂0 = 1/2 everywhere, independent draws give each sample about half its pixels;
    correlated draws (one shared factor per sample) spread that fraction far wider, while
    the mean over samples stays 1/2."""
    g = torch.Generator().manual_seed(2)
    n, shape = 2000, (2000, 1, 16, 16)
    x0_hat = torch.full(shape, 0.5)
    x_t = torch.zeros(shape)
    spread = {}
    for rho in (0.0, 0.9):
        k = _correlated(rho)
        x_s, _ = k.denoise(x_t, x0_hat, 999, 0, k.noise(shape, g))
        drawn = 1.0 - k._keep_probability(999, 0)  # fraction of pixels drawn from x̂0
        frac = x_s.reshape(n, -1).mean(1) / drawn
        assert frac.mean().item() == pytest.approx(0.5, abs=0.02)
        spread[rho] = frac.std().item()
    binomial_sd = (0.25 / (256 * (1.0 - _correlated(0.0)._keep_probability(999, 0)))) ** 0.5
    assert spread[0.0] == pytest.approx(binomial_sd, rel=0.15)
    assert spread[0.9] > 5 * spread[0.0]


def test_correlated_chain_starts_from_independent_noise():
    k = _correlated(0.9)
    g = torch.Generator().manual_seed(3)
    noise = k.noise((20000, 1, 1, 11), g)
    assert noise.shape == (20000, 2, 1, 11)
    p = torch.linspace(0, 1, 11).reshape(1, 1, 1, 11)
    x = k.init(noise, p)
    assert x.shape == (20000, 1, 1, 11)
    np.testing.assert_allclose(x.mean(0).flatten().numpy(), p.flatten().numpy(), atol=0.015)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "bernoulli", "draw_correlation": 1.5}, r"draw_correlation must lie in \[0, 1\]"),
    ({"kind": "bernoulli", "draw_correlation": -0.1}, r"draw_correlation must lie in \[0, 1\]"),
    ({"kind": "gaussian", "draw_correlation": 0.5}, "Bernoulli kernel only"),
])
def test_draw_correlation_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)


# ---------------------------------------------------------------- temperature
def _tempered(tau, rho=0.0):
    return BernoulliKernel(DiffusionConfig(kind="bernoulli", prediction="x0",
                                           draw_correlation=rho, temperature=tau))


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.2, 2.0])
def test_sharpen_is_the_normalised_power(tau):
    """sigmoid(logit(p)/τ) = p^(1/τ) / (p^(1/τ) + (1 − p)^(1/τ)), and it keeps p > 1/2."""
    p = np.linspace(0.01, 0.99, 99)
    expected = p ** (1 / tau) / (p ** (1 / tau) + (1 - p) ** (1 / tau))
    got = _tempered(tau).sharpen(torch.from_numpy(p)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(got > 0.5, p > 0.5)


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_tempered_step_draws_from_the_sharpened_x0(rho):
    """P(x_s = 1) per pixel is σ x_t + (1 − σ) sharpen(x̂0); the returned x̂0 is the
    network's, unsharpened."""
    k = _tempered(0.25, rho)
    g = torch.Generator().manual_seed(4)
    n = 40000
    x0_hat = torch.linspace(0.02, 0.98, 8).reshape(1, 1, 1, 8).expand(n, 1, 2, 8)
    x_t = torch.tensor([0.0, 1.0]).reshape(1, 1, 2, 1).expand(n, 1, 2, 8)
    x_s, back = k.denoise(x_t, x0_hat, 600, 400, k.noise((n, 1, 2, 8), g))
    p = x0_hat[0].double() ** 4 / (x0_hat[0].double() ** 4 + (1 - x0_hat[0].double()) ** 4)
    sigma = k._keep_probability(600, 400)
    expected = sigma * x_t[0] + (1 - sigma) * p
    np.testing.assert_allclose(x_s.mean(0).numpy(), expected.numpy(), atol=0.01)
    assert torch.equal(back, x0_hat)
    last, back = k.denoise(x_t[:2], x0_hat[:2], 100, -1, None)  # the final step: x̂0 itself
    assert torch.equal(last, x0_hat[:2]) and torch.equal(back, x0_hat[:2])


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "bernoulli", "temperature": 0.0}, "temperature must be a positive number, got 0.0"),
    ({"kind": "bernoulli", "temperature": -1.0}, "temperature must be a positive number"),
    ({"kind": "bernoulli", "temperature": float("nan")}, "temperature must be a positive number"),
    ({"kind": "bernoulli", "temperature": float("inf")}, "temperature must be a positive number"),
    ({"kind": "gaussian", "temperature": 0.5}, "temperature applies to the Bernoulli kernel only"),
])
def test_temperature_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionConfig(**kwargs)


def test_forward_from_a_later_state_composes_to_the_forward_process(kernel):
    """q(x_t | x_s) after q(x_s | x_0) has the marginal of q(x_t | x_0), sample by sample."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(4, 1, 200, 200)
    x0[:, :, :100] = 1
    s = torch.tensor([0, 100, 400, 999])
    t = torch.tensor([50, 300, 400, 999])
    x_s = kernel.q_sample(x0, s, generator=g)
    x_t = kernel.q_sample_later(x_s, s, t, generator=g)
    want = kernel.q_probs(x0, t)
    for i in range(4):
        for half in (slice(0, 100), slice(100, 200)):
            got = float(x_t[i, 0, half].mean())
            assert got == pytest.approx(float(want[i, 0, half].mean()), abs=0.01), (i, half)
    torch.testing.assert_close(x_t[2], x_s[2])  # t == s keeps the state


def test_batched_step_probs_equal_the_scalar_step_per_sample(kernel):
    g = torch.Generator().manual_seed(1)
    x_t = (torch.rand(4, 1, 5, 5, generator=g) < 0.5).float()
    x0_hat = torch.rand(4, 1, 5, 5, generator=g)
    t, s = torch.tensor([999, 500, 111, 40]), torch.tensor([888, 389, 0, 39])
    got = kernel.step_probs_batch(x_t, x0_hat, t, s)
    for i in range(4):
        want = kernel.step_probs(x_t[i:i + 1], x0_hat[i:i + 1], int(t[i]), int(s[i]))
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="must go backwards in time"):
        kernel.step_probs_batch(x_t, x0_hat, t, t)
