"""Train / validation / test splits by case, so that no case leaks between them.

Cases are ordered by a hash of their id and the seed, and the first ones go to ``train``,
the next to ``val``, the last to ``test``, in numbers that follow the fractions (every split
with a non-zero fraction gets at least one case when there are enough cases). The order does
not depend on the order the cases are listed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .dataset import SegDataset

__all__ = ["split_cases", "split_dataset", "SPLITS", "DEFAULT_FRACTIONS"]

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def _unit(case: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{case}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_cases(cases: Iterable[str], fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                seed: int = 0) -> dict[str, list[str]]:
    """Assign each case to ``train``, ``val`` or ``test``.

    Parameters
    ----------
    cases
        Case ids (duplicates are ignored).
    fractions
        Target fractions of train, val and test (they are normalised to sum to 1).
    seed
        Changes the assignment.
    """
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or sum(fr) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    total = sum(fr)
    ordered = sorted(dict.fromkeys(cases), key=lambda c: (_unit(str(c), seed), str(c)))
    n = len(ordered)
    n_test = round(n * fr[2] / total)
    n_val = round(n * fr[1] / total)
    if n >= 3:
        n_test = max(n_test, 1 if fr[2] > 0 else 0)
        n_val = max(n_val, 1 if fr[1] > 0 else 0)
    n_train = max(n - n_val - n_test, 0)
    return {"train": ordered[:n_train], "val": ordered[n_train:n_train + n_val],
            "test": ordered[n_train + n_val:]}


def split_dataset(ds: SegDataset, split: str,
                  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                  seed: int = 0) -> SegDataset:
    """The items of one split (``train``, ``val``, ``test``, or ``all``)."""
    if split == "all":
        return ds.subset(ds.cases(), "all")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS + ('all',)}")
    return ds.subset(split_cases(ds.cases(), fractions, seed)[split], split)
