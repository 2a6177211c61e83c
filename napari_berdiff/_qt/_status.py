"""The status line after a finished run: figures a user can check by browsing the layers.

No Qt here: plain functions from the run's arrays and :class:`~._run.Outcome` to text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: at most this many runs of equal counts are listed for a volume; the rest is summarised
MAX_GROUPS = 6


def marked_per_slice(samples: np.ndarray) -> np.ndarray:
    """How many of the N samples mark something on each slice: ``(Z,)`` for ``(N, Z, h, w)``
    samples, a single value ``(1,)`` for ``(N, h, w)`` or ``(N, 1, h, w)``."""
    s = np.asarray(samples) > 0
    if s.ndim == 4:
        return s.any(axis=(2, 3)).sum(axis=0)
    return np.array([int(s.reshape(len(s), -1).any(axis=1).sum())])


def _groups(counts: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal values: ``(first, last, value)``."""
    out: list[tuple[int, int, int]] = []
    for i, c in enumerate(counts.tolist()):
        if out and out[-1][2] == c:
            out[-1] = (out[-1][0], i, c)
        else:
            out.append((i, i, c))
    return out


def marked_text(samples: np.ndarray) -> str:
    """``"12 of 16 samples mark a lesion"``, per slice (slider index) where it differs."""
    n = len(samples)
    counts = marked_per_slice(samples)
    if len(counts) == 1 or (counts == counts[0]).all():
        where = " on every slice" if len(counts) > 1 else ""
        return f"{int(counts[0])} of {n} samples mark a lesion{where}"
    groups = _groups(counts)
    parts = [(f"slice {a}" if a == b else f"slices {a}–{b}") + f": {c}"
             for a, b, c in groups[:MAX_GROUPS]]
    if len(groups) > MAX_GROUPS:
        parts.append("…")
    return (f"Samples (of {n}) marking a lesion, from {int(counts.min())} to "
            f"{int(counts.max())} per slice: " + " · ".join(parts))


def done_text(n: int, outcome: Any, samples: np.ndarray) -> str:
    """The status after a completed run: what ran, where, and what the samples show."""
    text = (f"Done: {n} samples × {outcome.n_steps} steps"
            + (f" × {outcome.n_slices} slices" if outcome.n_slices > 1 else "")
            + f" in {outcome.seconds:.1f} s on {outcome.device}. {marked_text(samples)}.")
    if outcome.presence is not None:
        over = " (mean over the slices)" if outcome.n_slices > 1 else ""
        text += (f" The model estimates that {outcome.presence:.0%} of readers would mark "
                 f"one{over}; each sample is one reader's draw.")
    return text
