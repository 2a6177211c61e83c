"""What made an accepted mask: the provenance record (no Qt, no napari, no torch).

Every accept appends one record to ``metadata[PROVENANCE_KEY]["accepts"]`` of the target
layer:

- ``model``: the checkpoint file, its sha256, its kind and name;
- ``seed``, ``steps`` (the count and the model's spacing when used), ``temperature``;
- ``choice``: ``{"sample": i}`` or ``{"consensus": "majority", "threshold": 0.5}`` /
  ``{"consensus": "frequency", "threshold": τ}``;
- ``region`` (mode, ``[y0, x0, y1, x1]``, slice), ``spacing`` (the image's, per spatial axis),
  ``label`` (the value written), ``n_samples``, ``time`` (UTC, ISO 8601).

The layer also keeps a checksum of its data just after the last accept, so a writer can tell
whether the mask was edited after it was accepted (:func:`edited_after_accept`). Writers
put :func:`provenance_document` into a JSON sidecar (NIfTI) or into the SEG.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

PROVENANCE_KEY = "napari_berdiff_provenance"
FORMAT = "napari-berdiff-provenance/1"

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (hex), cached by path, size and modification time; "" if the
    file cannot be read."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError:
        return ""
    key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def model_record(model: Any, checksum: bool = True) -> dict[str, Any]:
    """The model part of a record: file, sha256 ("" until filled when ``checksum`` is
    False, see :func:`with_checksum`), kind, name."""
    path = str(getattr(model, "source_path", "") or "")
    meta = getattr(model, "metadata", {}) or {}
    return {
        "file": path,
        "sha256": file_sha256(path) if (path and checksum) else "",
        "kind": str(meta.get("kind", getattr(model, "kind", ""))),
        "name": str(meta.get("name", "") or os.path.basename(path).split(".")[0]),
    }


def with_checksum(record: Mapping[str, Any]) -> dict[str, Any]:
    """A model record with its file's sha256 filled in (cached after the first time)."""
    out = dict(record)
    if out.get("file") and not out.get("sha256"):
        out["sha256"] = file_sha256(out["file"])
    return out


def warm_checksum(path: str) -> None:
    """Hash ``path`` in a background thread, so that the first accept does not wait."""
    import threading

    if path:
        threading.Thread(target=file_sha256, args=(path,), daemon=True,
                         name="napari-berdiff-sha256").start()


def data_checksum(data: Any) -> str:
    """A cheap checksum of an array's values, shape and type (change detection only)."""
    arr = np.ascontiguousarray(np.asarray(data))
    crc = zlib.crc32(memoryview(arr).cast("B"))
    return f"{crc:08x}:{arr.dtype.str}:{'x'.join(map(str, arr.shape))}"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def accept_record(*, model: Mapping[str, Any], seed: int, steps: int,
                  step_spec: Any = None, temperature: float | None = None,
                  choice: Mapping[str, Any], region: Mapping[str, Any],
                  spacing: Any = None, label: int = 1, n_samples: int | None = None,
                  time: str | None = None) -> dict[str, Any]:
    """One accept's record (see the module docstring)."""
    return {
        "model": with_checksum(model),
        "seed": int(seed),
        "steps": int(steps),
        "step_spec": step_spec if step_spec is None or isinstance(step_spec, (int, str))
        else str(step_spec),
        "temperature": None if temperature is None else float(temperature),
        "choice": dict(choice),
        "region": dict(region),
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "label": int(label),
        "n_samples": None if n_samples is None else int(n_samples),
        "time": time or now_utc(),
    }


def with_accept(metadata: Mapping[str, Any] | None, record: Mapping[str, Any],
                data_after: Any) -> dict[str, Any]:
    """A copy of ``metadata`` with ``record`` appended and the data's checksum updated."""
    meta = dict(metadata or {})
    prov = copy.deepcopy(meta.get(PROVENANCE_KEY) or {"format": FORMAT, "accepts": []})
    prov.setdefault("accepts", []).append(dict(record))
    prov["checksum"] = data_checksum(data_after)
    meta[PROVENANCE_KEY] = prov
    return meta


def edited_after_accept(metadata: Mapping[str, Any] | None, data: Any) -> bool | None:
    """Whether ``data`` changed since the last accept (None when nothing was accepted)."""
    prov = (metadata or {}).get(PROVENANCE_KEY)
    if not prov or not prov.get("checksum"):
        return None
    return data_checksum(data) != prov["checksum"]


def provenance_document(metadata: Mapping[str, Any] | None, data: Any) -> dict[str, Any] | None:
    """The record to write beside (or into) a saved mask, or None when there is none."""
    prov = (metadata or {}).get(PROVENANCE_KEY)
    if not prov or not prov.get("accepts"):
        return None
    from . import __version__

    return {
        "format": FORMAT,
        "software": f"napari-berdiff {__version__}",
        "accepts": copy.deepcopy(list(prov["accepts"])),
        "edited_after_accept": bool(edited_after_accept(metadata, data)),
        "written": now_utc(),
    }
