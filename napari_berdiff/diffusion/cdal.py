"""The cDAL kernel: a few-step Gaussian chain whose generator predicts ``x̂0`` (DESIGN §3.5).

cDAL (a Denoising-Diffusion-GAN fork) runs a chain of T = 2 or 4 steps on masks in [-1, 1].

- Schedule: ``t_i = (i/T)(1 − 1e-3) + 1e-3`` for i = 0..T,
  ``var(t) = 1 − exp(−½t²(β_max − β_min) − t·β_min)`` with β_min = 0.1, β_max = 20,
  ``ᾱ(t_i) = 1 − var(t_i)``, ``β_i = 1 − ᾱ(t_i)/ᾱ(t_{i−1})`` and ``β_0 = 1e-8``.
- Forward: ``x_i = √ᾱ_i·x_0 + √(1 − ᾱ_i)·ε`` with ``ᾱ_i = ∏_{j≤i}(1 − β_j)``; a training pair
  adds one step ``x_{i+1} = √(1 − β_{i+1})·x_i + √β_{i+1}·ε``.
- Reverse, from index i + 1 to i (the network is evaluated at the integer i):
  ``x_i ~ N(c₁·x̂0 + c₂·x_{i+1}, σ²)``, the Gaussian DDPM posterior of the chain
  ``β'_k = β_{k+1}`` (k = 0..T−1), with no noise at i = 0. A fresh z is drawn at every step
  (by the sampler) and the chain starts from N(0, I).

A sample's mask is ``x̂0 > 0`` (``x̂0 < 0`` for inverted masks, as the official lung data
stores them, and for the hippocampus' background channel).
"""

from __future__ import annotations

import numpy as np
import torch

from .config import DiffusionConfig

#: The β range of every released cDAL configuration.
BETA_MIN, BETA_MAX = 0.1, 20.0
EPS_SMALL = 1e-3
FIRST_BETA = 1e-8


def cdal_times(timesteps: int) -> np.ndarray:
    """``t_i = (i/T)(1 − 1e-3) + 1e-3`` for i = 0..T (float64)."""
    return np.arange(timesteps + 1, dtype=np.float64) / timesteps * (1 - EPS_SMALL) + EPS_SMALL


def cdal_betas(timesteps: int, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX
               ) -> np.ndarray:
    """The T + 1 betas of the chain: ``β_0 = 1e-8``, then ``1 − ᾱ(t_i)/ᾱ(t_{i−1})`` (float64)."""
    t = cdal_times(timesteps)
    var = 1.0 - np.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)
    abar = 1.0 - var
    return np.concatenate([[FIRST_BETA], 1.0 - abar[1:] / abar[:-1]])


class CDALKernel:
    """Forward process, posterior steps and the mask read-out of cDAL.

    Parameters
    ----------
    config
        A :class:`DiffusionConfig` with ``kind="cdal"`` (``prediction="x0"``).
    """

    kind = "cdal"

    def __init__(self, config: DiffusionConfig):
        if config.kind != "cdal":
            raise ValueError(f"CDALKernel needs kind='cdal', got {config.kind!r}")
        self.config = config
        T = config.timesteps
        self.betas = cdal_betas(T)
        self.alpha_bars = np.cumprod(1.0 - self.betas)  # ᾱ_i for i = 0..T (forward)
        # posterior of the chain β'_k = β_{k+1}: x_k from x_{k+1}, k = 0..T-1
        b = self.betas[1:]
        ab = np.cumprod(1.0 - b)
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        self.post_c0 = b * np.sqrt(ab_prev) / (1.0 - ab)
        self.post_ct = (1.0 - ab_prev) * np.sqrt(1.0 - b) / (1.0 - ab)
        self.post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        self.sign = -1.0 if config.inverted_masks else 1.0

    # ------------------------------------------------------------------ masks <-> chain
    def to_chain(self, masks: torch.Tensor) -> torch.Tensor:
        """{0, 1} foreground masks to the chain's values in [-1, 1] (inverted if so set)."""
        return self.sign * (2.0 * masks.float() - 1.0)

    # ------------------------------------------------------------------ forward process
    def _coef(self, values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(t).long().reshape(-1).cpu()
        out = torch.from_numpy(values)[idx].to(like.device, like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε`` (t in 0..T)."""
        abar = self._coef(self.alpha_bars, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_sample_pair(self, x0: torch.Tensor, t: torch.Tensor, noise_t: torch.Tensor,
                      noise_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training pair ``(x_t, x_{t+1})`` for t in 0..T−1."""
        x_t = self.q_sample(x0, t, noise_t)
        beta = self._coef(self.betas, torch.as_tensor(t) + 1, x0)
        return x_t, (1 - beta).sqrt() * x_t + beta.sqrt() * noise_step

    # ------------------------------------------------------------------ reverse process
    def posterior(self, x0: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor | int,
                  noise: torch.Tensor | None) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_{t+1}, x̂0)``; no noise where t = 0 (or noise is None)."""
        tt = torch.as_tensor(t).long().reshape(-1)
        if tt.numel() == 1 and x0.shape[0] != 1:
            tt = tt.expand(x0.shape[0])
        mean = self._coef(self.post_c0, tt, x0) * x0 + self._coef(self.post_ct, tt, x0) * x_next
        if noise is None:
            return mean
        std = self._coef(np.sqrt(self.post_var), tt, x0)
        nonzero = (tt != 0).to(x0.device, x0.dtype).reshape(std.shape)
        return mean + nonzero * std * noise

    # ------------------------------------------------------------------ sampler protocol
    def check_visited(self, visited: list[int]) -> None:
        """cDAL visits every step of its chain; a sub-sequence is refused."""
        T = self.config.timesteps
        if list(visited) != list(range(T)):
            raise ValueError(
                f"a cDAL model takes all of its T={T} steps (it was trained for exactly these "
                f"transitions); got {len(visited)} step(s). Use steps={T} or leave it unset."
            )

    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Standard normal draws (on the CPU) for the whole batch."""
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def init(self, noise: torch.Tensor, prior=None) -> torch.Tensor:
        """The start of the chain: ``x_T ~ N(0, I)``."""
        return noise.clone()

    def denoise(self, x_t: torch.Tensor, net_out: torch.Tensor, t: int, s: int,
                noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step from the sampler's index t (the network's) to s = t − 1.

        Returns ``(x_s, x̂0)``; the last step (t = 0) returns the posterior mean, which is
        ``x̂0`` itself.
        """
        x0 = net_out
        return self.posterior(x0, x_t, t, None if t == 0 else noise), x0

    def probabilities(self, x0_hat: torch.Tensor) -> torch.Tensor:
        """Foreground "probability" ``(1 ± x̂0)/2`` clamped to [0, 1], from the first channel;
        it exceeds 1/2 exactly where the mask is foreground."""
        return ((1.0 + self.sign * x0_hat[:, :1]) / 2.0).clamp(0.0, 1.0)

    def binary(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground of the current states: ``x > 0`` (``x < 0`` when inverted)."""
        return self.sign * x[:, :1] > 0
