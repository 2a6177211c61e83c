"""The Gaussian kernel (Wolleb et al.): a DDPM on the mask channel with ε-prediction.

Sub-sequence sampling recomputes each jump's coefficients from the ᾱ of the visited steps
(respacing, as improved DDPM does). With ``learn_sigma`` the network's second channel ``v``
interpolates the log-variance between the posterior variance and β (improved DDPM's
learned range). Masks live in {0, 1}; a sample's binary mask is ``x̂_0 > 0.5``.
"""

from __future__ import annotations

import math

import torch

from .config import DiffusionConfig
from .schedules import Schedule


class GaussianKernel:
    """Forward process, DDPM/DDIM reverse steps and ε-MSE loss.

    Parameters
    ----------
    config
        A :class:`DiffusionConfig` with ``kind="gaussian"``.
    clip_denoised
        Clamp ``x̂_0`` to [-1, 1] before it enters a step, as the official sampler does.
    eta
        DDIM stochasticity (0 is deterministic DDIM).
    """

    kind = "gaussian"

    def __init__(self, config: DiffusionConfig, clip_denoised: bool = True, eta: float = 0.0):
        if config.kind != "gaussian":
            raise ValueError(f"GaussianKernel needs kind='gaussian', got {config.kind!r}")
        self.config = config
        self.schedule = Schedule(config.schedule, config.timesteps)
        self.clip_denoised = clip_denoised
        self.eta = eta
        self._abar = torch.from_numpy(self.schedule.alpha_bars)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε``."""
        t = torch.as_tensor(t).long().reshape(-1).cpu()
        abar = self._abar[t].to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    # ------------------------------------------------------------------ reverse process
    def split_output(self, net_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split the network output into ε and (with learned sigma) the interpolation v."""
        if self.config.learn_sigma:
            if net_out.shape[1] % 2:
                raise ValueError(
                    f"learn_sigma needs an even number of output channels, got {net_out.shape[1]}"
                )
            half = net_out.shape[1] // 2
            return net_out[:, :half], net_out[:, half:]
        return net_out, None

    def predict_x0(self, eps: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        abar = self.schedule.alpha_bar(t)
        x0 = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        return x0.clamp(-1, 1) if self.clip_denoised else x0

    def _jump(self, t: int, s: int) -> tuple[float, float, float]:
        """ᾱ_t, ᾱ_s and the respaced β of the jump t → s (s < 0 means ᾱ_s = 1)."""
        abar_t = self.schedule.alpha_bar(t)
        abar_s = self.schedule.alpha_bar(s)
        return abar_t, abar_s, 1.0 - abar_t / abar_s

    def ddim_step(
        self, x_t: torch.Tensor, x0: torch.Tensor, t: int, s: int, noise: torch.Tensor
    ) -> torch.Tensor:
        """DDIM update from t to s given ``x̂_0``; ε is re-derived from the (clipped) x̂_0."""
        abar_t, abar_s, _ = self._jump(t, s)
        eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        sigma = self.eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        mean = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps
        return mean + sigma * noise if sigma > 0 else mean

    def ddpm_step(
        self, x_t: torch.Tensor, v: torch.Tensor | None, x0: torch.Tensor, t: int, s: int,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Ancestral DDPM update from t to s on the respaced chain.

        The variance is the posterior variance of the jump, or with learned sigma
        ``exp(frac·log β + (1 − frac)·log σ²_post)`` with ``frac = (v + 1)/2``.
        """
        abar_t, abar_s, beta = self._jump(t, s)
        c0 = math.sqrt(abar_s) * beta / (1 - abar_t)
        ct = math.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t)
        mean = c0 * x0 + ct * x_t
        post_var = beta * (1 - abar_s) / (1 - abar_t)
        if post_var <= 0:  # the jump onto s = -1 carries no noise
            return mean
        if v is None:
            return mean + math.sqrt(post_var) * noise
        log_min = math.log(post_var)
        log_max = math.log(beta)
        frac = (v + 1) / 2
        log_var = frac * log_max + (1 - frac) * log_min
        return mean + torch.exp(0.5 * log_var) * noise

    # ------------------------------------------------------------------ sampler protocol
    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Standard normal draws (on the CPU) that drive one step for the whole batch."""
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def init(self, noise: torch.Tensor, prior=None) -> torch.Tensor:
        """The start of the chain: ``x_T ~ N(0, 1)``."""
        return noise.clone()

    def denoise(
        self, x_t: torch.Tensor, net_out: torch.Tensor, t: int, s: int, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step. Returns ``(x_s, x̂_0)``; at the last step (``s < 0``) x_s = x̂_0,
        which is also what both DDPM and DDIM give there (ᾱ_s = 1, no noise)."""
        eps, v = self.split_output(net_out)
        x0 = self.predict_x0(eps, x_t, t)
        if s < 0:
            return x0, x0
        if self.config.sampler == "ddim":
            return self.ddim_step(x_t, x0, t, s, noise), x0
        return self.ddpm_step(x_t, v, x0, t, s, noise), x0

    @staticmethod
    def probabilities(x0_hat: torch.Tensor) -> torch.Tensor:
        return x0_hat.clamp(0.0, 1.0)

    @staticmethod
    def binary(x: torch.Tensor) -> torch.Tensor:
        return x > 0.5

    # ------------------------------------------------------------------ training
    def loss(
        self, net_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample ε-MSE. With learned sigma only the ε half is trained here; the
        variance channel of an official checkpoint is used as trained, for sampling."""
        eps, _ = self.split_output(net_out)
        mse = ((eps - noise) ** 2).flatten(1).mean(1)
        return {"mse": mse, "loss": mse}
