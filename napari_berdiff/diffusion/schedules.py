"""Noise schedules and the sub-sequences of timesteps visited when sampling.

Timesteps are 0-based indices ``i = 0..T-1`` and ``alpha_bar[i] = prod_{j<=i} alpha_j``,
as in the official BerDiff / improved-diffusion code (DESIGN §3).
"""

from __future__ import annotations

import math
import re

import numpy as np


def betas_for(schedule: str, timesteps: int) -> np.ndarray:
    """Return the float64 betas of a named schedule.

    Parameters
    ----------
    schedule
        ``"cosine"`` (improved DDPM; BerDiff's ``cosine2``), ``"linear"`` (DDPM, scaled to
        ``T``) or ``"alpha_bar_linear"`` (``alpha_bar[i] = 1 - (i+1)/T``).
    timesteps
        Chain length T.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    T = timesteps
    if schedule == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if schedule == "cosine":

        def f(t: float) -> float:
            return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1.0 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)
    if schedule == "alpha_bar_linear":
        abar = 1.0 - np.arange(1, T + 1, dtype=np.float64) / T
        prev = np.concatenate([[1.0], abar[:-1]])
        return 1.0 - abar / prev
    raise ValueError(
        f"unknown schedule {schedule!r}; expected 'cosine', 'linear' or 'alpha_bar_linear'"
    )


def alpha_bars_from_betas(betas: np.ndarray) -> np.ndarray:
    """Cumulative products ``alpha_bar[i] = prod_{j<=i} (1 - beta_j)``."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def timestep_subsequence(spec: str | int, timesteps: int) -> list[int]:
    """Return the increasing 0-based timestep indices visited when sampling.

    Parameters
    ----------
    spec
        An int N or ``"N"`` / ``"uniform:N"`` for N evenly spaced steps ending at ``T-1``
        and starting at 0; ``"ddimuniN"`` for the official ``{0, T/N, ..., T - T/N}``;
        ``"quadratic:N"`` for steps dense near 0 (``(linspace(0, sqrt(0.8 T), N))**2``,
        as in DDIM).
    timesteps
        Chain length T.
    """
    T = timesteps
    kind, n = _parse_spec(spec)
    if n < 1:
        raise ValueError(f"the number of steps must be >= 1, got {n}")
    if n > T:
        raise ValueError(f"cannot visit {n} steps of a chain with only T={T} timesteps")
    if kind == "uniform":
        if n == 1:
            return [T - 1]
        steps = np.round(np.linspace(0, T - 1, n)).astype(int)
    elif kind == "ddimuni":
        if T % n:
            raise ValueError(f"ddimuni{n} needs T divisible by {n}; T is {T}")
        steps = np.arange(0, T, T // n)
    else:  # quadratic
        steps = np.round(np.linspace(0, math.sqrt(0.8 * T), n) ** 2).astype(int)
        steps = np.maximum.accumulate(steps)
    out = sorted(set(int(s) for s in steps))
    if len(out) != n:
        raise ValueError(
            f"{spec!r} gives repeated timesteps for T={T}; choose fewer steps or another spacing"
        )
    return out


def _parse_spec(spec: str | int) -> tuple[str, int]:
    if isinstance(spec, (int, np.integer)):
        return "uniform", int(spec)
    s = str(spec).strip()
    m = re.fullmatch(r"(?:(uniform|quadratic):)?(\d+)", s) or re.fullmatch(r"(ddimuni)(\d+)", s)
    if not m:
        raise ValueError(
            f"unrecognised step spec {spec!r}; use an int, 'uniform:N', 'quadratic:N' or 'ddimuniN'"
        )
    return (m.group(1) or "uniform"), int(m.group(2))


class Schedule:
    """Precomputed schedule arrays for a chain of length T (float64 numpy)."""

    def __init__(self, name: str, timesteps: int):
        self.name = name
        self.timesteps = timesteps
        self.betas = betas_for(name, timesteps)
        self.alphas = 1.0 - self.betas
        self.alpha_bars = alpha_bars_from_betas(self.betas)

    def alpha_bar(self, i: int) -> float:
        """``alpha_bar[i]``, with ``alpha_bar[-1] = 1`` (the value "before" step 0)."""
        return 1.0 if i < 0 else float(self.alpha_bars[i])

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, T={self.timesteps})"
