"""A sequence whose items are computed on first access and kept: a volume's slices are
prepared (resampled, normalised, checked) when their batch starts, not all before the
first frame (DESIGN §8)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class LazySequence(Sequence[T], Generic[T]):
    """``count`` items, item ``i`` being ``make(i)``, computed once, when first indexed.

    Parameters
    ----------
    make
        Builds item ``i`` (0 <= i < count); an exception it raises reaches the caller that
        indexed the item, and the item is tried again on the next access.
    count
        The number of items.
    """

    def __init__(self, make: Callable[[int], T], count: int):
        if count < 0:
            raise ValueError(f"count must be >= 0; got {count}")
        self._make = make
        self._items: dict[int, T] = {}
        self._count = int(count)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        i = int(index)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"index {index} is out of range for {self._count} items")
        if i not in self._items:
            self._items[i] = self._make(i)
        return self._items[i]
