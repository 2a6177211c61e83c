"""A mixin for the frozen dataclasses that describe networks and diffusion settings."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C", bound="ConfigMixin")


class ConfigMixin:
    """``to_dict`` (JSON-friendly), strict ``from_dict`` and ``replace`` for a dataclass."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls._what} settings: {', '.join(unknown)}")
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    _what = "configuration"
