"""The error every checkpoint problem raises, and helpers to word it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["CheckpointError", "PresetRequired", "short_list", "key_report", "compare_keys"]

Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the network it is loaded into.

    A subclass of ``ValueError``: callers that catch ``ValueError`` see these too.
    """


class PresetRequired(CheckpointError):
    """An official state_dict whose preset cannot be recognised: the caller must name one."""


def short_list(items: Sequence[str], limit: int = 8) -> str:
    """``"a, b, c … and 312 more"``: the first ``limit`` items, then a count."""
    items = list(items)
    head = ", ".join(items[:limit])
    if len(items) > limit:
        head += f" … and {len(items) - limit} more"
    return head


def compare_keys(
    expected: Mapping[str, Shape], found: Mapping[str, Shape]
) -> tuple[list[str], list[str], list[tuple[str, Shape, Shape]]]:
    """Missing keys, unexpected keys and ``(key, file shape, network shape)`` mismatches.

    Keys keep the network's order (missing, mismatched) or the file's (unexpected).
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        (k, tuple(found[k]), tuple(shape))
        for k, shape in expected.items()
        if k in found and tuple(found[k]) != tuple(shape)
    ]
    return missing, unexpected, mismatched


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in s) + "]"


def key_report(
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[tuple[str, Shape, Shape]],
    limit: int = 8,
) -> str:
    """Word a key comparison for people, one line per kind of problem, shortened when long."""
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing key(s): {short_list(missing, limit)}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): {short_list(unexpected, limit)}")
    if mismatched:
        items = [f"{k} (file {_shape(a)}, network {_shape(b)})" for k, a, b in mismatched]
        lines.append(f"{len(mismatched)} shape mismatch(es): {short_list(items, limit)}")
    return "\n  ".join(lines)


def corrupt(path: str | Path, detail: str = "") -> CheckpointError:
    """The error for a file that cannot be parsed."""
    msg = f"{Path(path).name}: the file is truncated or corrupt"
    if detail:
        msg += f" ({detail})"
    msg += f". Download or copy it again. [{path}]"
    return CheckpointError(msg)
