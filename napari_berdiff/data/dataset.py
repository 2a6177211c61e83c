"""The in-memory segmentation data set the loaders return and the trainers consume."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SegItem", "SegDataset"]


@dataclass
class SegItem:
    """One image with its reference masks.

    Attributes
    ----------
    image
        (H, W) or (C, H, W) float32, intensities in [0, 1] for the LIDC layout.
    masks
        (K, H, W) uint8 0/1, one mask per annotator (K >= 1).
    case
        The case (patient) id; splits never separate the slices of one case.
    slice
        The slice id within the case.
    info
        Anything else known (for phantoms: contrast, faint, thresholds …).
    """

    image: np.ndarray
    masks: np.ndarray
    case: str
    slice: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_chw(self) -> np.ndarray:
        return self.image[None] if self.image.ndim == 2 else self.image

    @property
    def n_annotators(self) -> int:
        return int(self.masks.shape[0])


class SegDataset(Sequence):
    """A list of :class:`SegItem` with a description of where it came from."""

    def __init__(self, items: Iterable[SegItem], description: dict[str, Any] | None = None):
        self.items = list(items)
        self.description = dict(description or {})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return SegDataset(self.items[i], self.description)
        return self.items[i]

    def __iter__(self) -> Iterator[SegItem]:
        return iter(self.items)

    def __repr__(self) -> str:
        return (f"SegDataset({len(self)} items, {len(self.cases())} cases, "
                f"{self.description.get('layout', '?')})")

    def cases(self) -> list[str]:
        """Case ids in first-seen order."""
        return list(dict.fromkeys(it.case for it in self.items))

    def subset(self, cases: Iterable[str], split: str | None = None) -> "SegDataset":
        """The items whose case is in ``cases``, in the original order."""
        keep = set(cases)
        desc = dict(self.description)
        if split is not None:
            desc["split"] = split
        return SegDataset([it for it in self.items if it.case in keep], desc)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) shared by every item; a ValueError when they differ."""
        shapes = {it.image_chw.shape for it in self.items}
        if len(shapes) != 1:
            raise ValueError(
                f"the images do not all have the same shape ({sorted(shapes)[:4]} …); "
                "crop or resize them to one size before training"
            )
        return next(iter(shapes))

    def max_annotators(self) -> int:
        return max((it.n_annotators for it in self.items), default=0)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stacked ``images (N, C, H, W) float32``, ``masks (N, Kmax, H, W) uint8`` (padded
        with empty masks) and ``counts (N,)``, the real number of masks of each item."""
        if not self.items:
            raise ValueError("the data set is empty")
        c, h, w = self.image_shape
        kmax = self.max_annotators()
        images = np.stack([it.image_chw.astype(np.float32) for it in self.items])
        masks = np.zeros((len(self), kmax, h, w), np.uint8)
        counts = np.zeros(len(self), np.int64)
        for i, it in enumerate(self.items):
            masks[i, : it.n_annotators] = it.masks
            counts[i] = it.n_annotators
        return images, masks, counts

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (for checkpoint metadata)."""
        d = dict(self.description)
        d["items"] = len(self)
        d["cases"] = len(self.cases())
        if self.items:
            try:
                d["image_shape"] = list(self.image_shape)
            except ValueError:
                d["image_shape"] = "varies"
            d["annotators"] = self.max_annotators()
        return d
