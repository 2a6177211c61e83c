"""The energy score of a set of soft masks against an annotator's mask, with GED's distance.

``GED² = 2·E d(S, Y) − E d(S, S') − E d(Y, Y')`` with ``d = 1 − IoU`` is how the project
scores a model's samples against the readers. Dropping the term that does not depend on the
model and halving gives the *energy score* ``E d(S, y) − ½·E d(S, S')`` of one annotator's
mask ``y``, which a generator can minimise over K samples drawn with different latents for
the same input. With the soft Jaccard distance

    d(a, b) = 1 − (Σ min(a, b) + ε) / (Σ max(a, b) + ε),

one minus the min-max (Ruzicka) kernel, which is positive definite on non-negative vectors
(the ε is one more coordinate of value ε), ``d`` is of negative type, so the score is
proper: in expectation over the annotators it is minimised by their distribution, not by
their mean mask (Gneiting & Raftery 2007, kernel scores). Two empty masks are at distance 0,
as in GED.
"""

from __future__ import annotations

import torch

__all__ = ["soft_jaccard_distance", "energy_score"]


def soft_jaccard_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 − (Σ min(a, b) + eps) / (Σ max(a, b) + eps)`` over the last dimension.

    Parameters
    ----------
    a, b
        Soft masks in [0, 1], broadcastable, pixels along the last dimension.
    eps
        Smoothing in pixels: two empty masks are at distance 0.
    """
    inter = torch.minimum(a, b).sum(-1)
    union = torch.maximum(a, b).sum(-1)
    return 1.0 - (inter + eps) / (union + eps)


def energy_score(samples: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per item ``mean_k d(s_k, y) − ½·mean_{k≠l} d(s_k, s_l)``.

    Parameters
    ----------
    samples
        (B, K, P) soft masks in [0, 1], K ≥ 2 samples of one input each.
    target
        (B, P) the annotator's mask of each item.

    Returns
    -------
    torch.Tensor
        (B,) the scores (lower is better).
    """
    if samples.ndim != 3 or samples.shape[1] < 2:
        raise ValueError(f"samples must be (B, K >= 2, P), got {tuple(samples.shape)}")
    k = samples.shape[1]
    to_target = soft_jaccard_distance(samples, target[:, None, :], eps).mean(1)
    pairwise = soft_jaccard_distance(samples[:, :, None, :], samples[:, None, :, :], eps)
    spread = pairwise.sum((1, 2)) / (k * (k - 1))  # the diagonal is 0
    return to_target - 0.5 * spread
