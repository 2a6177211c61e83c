"""The Bernoulli diffusion kernel (BerDiff), with an optional prior map p (HiDiff's BBDM).

For BerDiff ``p = 1/2`` everywhere; for the HiDiff-style refiner ``p`` is the prior mask's
probability. Formulas follow DESIGN §3.2; all tensors are float with values in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import DiffusionConfig
from .schedules import Schedule

EPS = 1e-7
LN2 = math.log(2.0)

PriorLike = torch.Tensor | float


def _clamp(p: torch.Tensor) -> torch.Tensor:
    return p.clamp(EPS, 1.0 - EPS)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (N,) coefficient so that it broadcasts over x (N, C, H, W)."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli draws ``u < probs`` with the uniforms made on the CPU (seeded generators)."""
    u = torch.rand(probs.shape, generator=generator, dtype=probs.dtype).to(probs.device)
    return u < probs


class BernoulliKernel:
    """Forward process, posterior, accelerated reverse step and loss of Bernoulli diffusion.

    Parameters
    ----------
    config
        A :class:`DiffusionConfig` with ``kind="bernoulli"``.
    """

    kind = "bernoulli"

    def __init__(self, config: DiffusionConfig):
        if config.kind != "bernoulli":
            raise ValueError(f"BernoulliKernel needs kind='bernoulli', got {config.kind!r}")
        self.config = config
        self.schedule = Schedule(config.schedule, config.timesteps)
        self._abar = torch.from_numpy(self.schedule.alpha_bars)
        self._alpha = torch.from_numpy(self.schedule.alphas)
        # alpha_bar "before" each step: alpha_bar[i-1], with 1 at i = 0.
        self._abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self._abar[:-1]])

    # ------------------------------------------------------------------ coefficients
    def _coef(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=table.device).long().reshape(-1)
        if t.numel() == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        return _per_sample(table[t], x).to(x.device)

    # ------------------------------------------------------------------ forward process
    def q_probs(self, x0: torch.Tensor, t: torch.Tensor, prior: PriorLike = 0.5) -> torch.Tensor:
        """Mean of ``q(x_t | x_0) = B(abar_t x_0 + (1 - abar_t) p)``."""
        abar = self._coef(self._abar, t, x0)
        return abar * x0 + (1.0 - abar) * prior

    def q_sample(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        prior: PriorLike = 0.5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0)``."""
        return _draw(self.q_probs(x0, t, prior), generator).to(x0.dtype)

    def q_sample_later(
        self,
        x_s: torch.Tensor,
        s: torch.Tensor,
        t: torch.Tensor,
        prior: PriorLike = 0.5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_s) = B(r x_s + (1 − r) p)``, ``r = ᾱ_t / ᾱ_s``, for
        ``t ≥ s`` (per sample). Where ``t == s``, ``r = 1`` and ``x_t = x_s`` exactly."""
        abar_s = self._coef(self._abar, s, x_s)
        abar_t = self._coef(self._abar, t, x_s)
        r = torch.where(abar_s > 0, abar_t / abar_s.clamp_min(1e-30), torch.ones_like(abar_s))
        return _draw(r * x_s + (1.0 - r) * prior, generator).to(x_s.dtype)

    def posterior(
        self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, prior: PriorLike = 0.5
    ) -> torch.Tensor:
        """``P(x_{t-1} = 1 | x_t, x_0)``; ``x0`` may be a probability (the prediction)."""
        a = self._coef(self._alpha, t, x_t)
        ab_prev = self._coef(self._abar_prev, t, x_t)
        flip = (1.0 - a) * (1.0 - x_t - prior).abs()
        theta1 = (a * (1.0 - x_t) + flip) * (ab_prev * (1.0 - x0) + (1.0 - ab_prev) * (1.0 - prior))
        theta2 = (a * x_t + flip) * (ab_prev * x0 + (1.0 - ab_prev) * prior)
        return theta2 / (theta1 + theta2)

    # ------------------------------------------------------------------ reverse process
    def predict_x0(self, net_out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Turn the network's probability output into ``x̂_0``.

        In ``eps`` mode the network predicts the flip probability ``ε̂ ≈ P(x_t ≠ x_0)``,
        so ``x̂_0 = |x_t − ε̂|``; in ``x0`` mode it predicts ``x̂_0`` directly.
        """
        if self.config.prediction == "eps":
            return (x_t - net_out).abs()
        return net_out

    def step_probs(
        self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, s: int
    ) -> torch.Tensor:
        """Mean of the accelerated step from ``t`` to an earlier visited step ``s``.

        ``σ = (1 − ᾱ_s)/(1 − ᾱ_t)`` and the mean is ``σ x_t + (ᾱ_s − σ ᾱ_t) x̂_0``; the prior
        cancels for this σ, and the mean is a convex combination, so it stays in [0, 1].
        """
        sigma, take = (float(v) for v in self._step_coefficients(t, s))
        return (sigma * x_t + take * x0_hat).clamp(0.0, 1.0)

    def step_probs_batch(
        self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, s: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`step_probs` with a per-sample ``t`` and ``s`` (tensors, ``s < t``); used to
        unroll sampler steps in training."""
        sigma, take = self._step_coefficients(t, s)
        keep = _per_sample(sigma, x_t).to(x_t.device)
        take = _per_sample(take, x_t).to(x_t.device)
        return (keep * x_t + take * x0_hat).clamp(0.0, 1.0)

    def _keep_probability(self, t: int, s: int) -> float:
        """σ = (1 − ᾱ_s)/(1 − ᾱ_t): the chance that the step t → s keeps a pixel of x_t."""
        return float(self._step_coefficients(t, s)[0])

    def _step_coefficients(
        self, t: int | torch.Tensor, s: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(σ, ᾱ_s − σ ᾱ_t)`` of the step ``t → s`` per sample, in float64 (s = −1: ᾱ = 1)."""
        t = torch.as_tensor(t).long().reshape(-1)
        s = torch.as_tensor(s).long().reshape(-1)
        if bool((s >= t).any()):
            show = [v.item() if v.numel() == 1 else v.tolist() for v in (t, s)]
            raise ValueError("an accelerated step must go backwards in time; got "
                             f"t={show[0]}, s={show[1]}")
        abar_t, abar_s = (torch.where(i < 0, 1.0, self._abar[i.clamp_min(0)]) for i in (t, s))
        sigma = (1.0 - abar_s) / (1.0 - abar_t)
        return sigma, abar_s - sigma * abar_t

    # ------------------------------------------------------------------ sampler protocol
    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Uniform draws (on the CPU) that drive one step for the whole batch.

        Independent draws (``draw_correlation == 0``): one uniform per pixel, shape ``shape``.
        Correlated draws: two uniforms per pixel, stacked on the channel axis (``2C``
        channels): the first decides whether a pixel keeps ``x_t``, the second draws it from
        ``x̂0``; the second is ``Φ(ρ z + √(1 − ρ²) ε)`` with ``z`` shared by the whole sample.
        Either way every value is uniform on [0, 1].
        """
        rho = float(self.config.draw_correlation)
        if not rho:
            return torch.rand(shape, generator=generator, dtype=torch.float32)
        keep = torch.rand(shape, generator=generator, dtype=torch.float32)
        eps = torch.randn(shape, generator=generator, dtype=torch.float32)
        z = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=generator,
                        dtype=torch.float32)
        draw = torch.special.ndtr(rho * z + math.sqrt(1.0 - rho * rho) * eps)
        return torch.cat([keep, draw], 1)

    def init(self, noise: torch.Tensor, prior: PriorLike = 0.5) -> torch.Tensor:
        """The start of the chain: ``x_T ~ B(p)`` (independent pixels in either mode)."""
        if self.config.draw_correlation:
            noise = noise[:, : noise.shape[1] // 2]
        return (noise < prior).to(noise.dtype)

    def denoise(
        self, x_t: torch.Tensor, net_out: torch.Tensor, t: int, s: int, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step. Returns ``(x_s, x̂_0)``; at the last step (``s < 0``) x_s = x̂_0.

        The step's mean is ``σ x_t + (1 − σ) x̂0`` (:meth:`step_probs`): with independent
        draws ``x_s ~ B(mean)``. With correlated draws the same mixture is drawn in two parts,
        ``x_s = x_t`` where the first uniform is below σ and ``x_s = [u₂ < x̂0]`` elsewhere,
        so each pixel's probability is unchanged and only the ``x̂0`` draws are correlated.
        Either way the step draws from :meth:`sharpen` ``(x̂0)``; the returned ``x̂0`` is not
        sharpened.
        """
        x0_hat = self.predict_x0(net_out, x_t)
        if s < 0:
            return x0_hat, x0_hat
        x0_step = self.sharpen(x0_hat)
        if not self.config.draw_correlation:
            mean = self.step_probs(x_t, x0_step, t, s)
            return (noise < mean).to(x_t.dtype), x0_hat
        sigma = self._keep_probability(t, s)
        c = x_t.shape[1]
        keep, draw = noise[:, :c], noise[:, c:]
        x_s = torch.where(keep < sigma, x_t, (draw < x0_step).to(x_t.dtype))
        return x_s, x0_hat

    def sharpen(self, x0_hat: torch.Tensor) -> torch.Tensor:
        """``x̂0`` as a reverse step draws from it: ``sigmoid(logit(x̂0) / temperature)``
        (unchanged at temperature 1). The sign of the logit, hence ``x̂0 > 0.5``, is kept."""
        tau = float(self.config.temperature)
        if tau == 1.0:
            return x0_hat
        return torch.sigmoid(torch.logit(_clamp(x0_hat)) / tau)

    @staticmethod
    def probabilities(x0_hat: torch.Tensor) -> torch.Tensor:
        return x0_hat

    @staticmethod
    def binary(x: torch.Tensor) -> torch.Tensor:
        return x > 0.5

    # ------------------------------------------------------------------ training
    def training_target(self, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """What the network is asked to predict: the flip map (eps) or ``x_0``."""
        return (x_t - x0).abs() if self.config.prediction == "eps" else x0

    def loss(
        self,
        net_out: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prior: PriorLike = 0.5,
        *,
        focal: bool = False,
        gamma: float = 2.0,
        bce_weight: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses.

        Returns a dict of (N,) tensors: ``vb`` (KL to the true posterior for t > 0, the
        negative log-likelihood of ``x_0`` at t = 0), ``bce`` (binary cross-entropy, or focal
        loss with ``focal=True``, on the prediction target) and ``loss = vb + bce_weight *
        bce``, all in bits per pixel, like the official "mix" loss.
        """
        t = torch.as_tensor(t, device=x0.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(x0.shape[0])
        pred = _clamp(net_out)
        x0_hat = _clamp(self.predict_x0(pred, x_t))
        q = _clamp(self.posterior(x_t, x0, t, prior))
        p = _clamp(self.posterior(x_t, x0_hat, t, prior))
        kl = (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).clamp_min(0.0)
        nll = -(x0 * x0_hat.log() + (1 - x0) * (1 - x0_hat).log())
        first = _per_sample(t == 0, x0).bool()
        vb = torch.where(first, nll, kl).flatten(1).mean(1) / LN2

        target = self.training_target(x0, x_t)
        if focal:
            pt = torch.where(target > 0.5, pred, 1 - pred)
            bce = -((1 - pt) ** gamma) * pt.log()
        else:
            bce = F.binary_cross_entropy(pred, target, reduction="none")
        bce = bce.flatten(1).mean(1) / LN2
        return {"vb": vb, "bce": bce, "loss": vb + bce_weight * bce}
