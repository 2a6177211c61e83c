"""Tiny stand-in networks that implement the condition-once interface for sampler tests."""

from __future__ import annotations

import torch
from torch import nn


class FixedX0Net(nn.Module):
    """Predicts the same x̂0 probability map whatever x_t and t (Bernoulli, x0 mode)."""

    def __init__(self, x0_prob: torch.Tensor):
        super().__init__()
        self.register_buffer("x0_prob", x0_prob.float())
        self.calls = 0

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.x0_prob.expand_as(x_t)


class PerfectEpsNet(nn.Module):
    """Gaussian ε-net that returns the exact noise for a known clean mask x0."""

    def __init__(self, x0: torch.Tensor, alpha_bars):
        super().__init__()
        self.register_buffer("x0", x0.float())
        self.register_buffer("abar", torch.as_tensor(alpha_bars, dtype=torch.float64))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        ab = self.abar[t].float().reshape(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()


class TinyConvNet(nn.Module):
    """A small random conv net whose output depends on x_t, t and the image (sigmoid)."""

    def __init__(self, image_channels: int = 1, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.image_channels = image_channels
        self.body = nn.Sequential(
            nn.Conv2d(1 + image_channels + 1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond = cond.expand(x_t.shape[0], *cond.shape[1:])
        tmap = (t.float() / 1000.0).reshape(-1, 1, 1, 1).expand_as(x_t)
        return torch.sigmoid(self.body(torch.cat([x_t, cond, tmap], 1)))


class RecordingSelfCondNet(TinyConvNet):
    """A self-conditioned :class:`TinyConvNet` that records every ``x0_prev`` it is given
    and mixes it into its output, so that the sampler's threading of x̂0 shows in results."""

    self_conditioned = True

    def __init__(self, seed: int = 0):
        super().__init__(seed=seed)
        self.seen: list[torch.Tensor] = []

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                x0_prev: torch.Tensor) -> torch.Tensor:
        self.seen.append(x0_prev.clone())
        return 0.5 * super().predict(x_t, t, cond) + 0.5 * x0_prev
