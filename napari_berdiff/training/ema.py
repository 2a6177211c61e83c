"""Exponential moving average of a network's weights."""

from __future__ import annotations

import copy

import torch

__all__ = ["EMA"]


class EMA:
    """Keeps ``module``, a copy of the network whose parameters follow
    ``ema ← d·ema + (1 − d)·θ`` with ``d = min(decay, (1 + step)/(10 + step))``.

    Buffers are copied as they are.
    """

    def __init__(self, net: torch.nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.module = copy.deepcopy(net).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def rate(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        d = self.rate(step)
        for e, p in zip(self.module.parameters(), net.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for e, b in zip(self.module.buffers(), net.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(sd)
