"""What kind of file a checkpoint is, judged from its first bytes (never by running it)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .errors import CheckpointError, corrupt

__all__ = ["sniff", "sha256_of", "SAFETENSORS", "TORCH_ZIP", "TORCH_LEGACY"]

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"  # torch.save since PyTorch 1.6
TORCH_LEGACY = "torch-legacy"  # torch.save(..., _use_new_zipfile_serialization=False) or pickle

EXPECTED = (
    "a napari-berdiff .safetensors file or an official PyTorch state_dict "
    "(BerDiff_epsilon.pt, model*.pt, ema_*.pt, savedmodel*.pt, emasavedmodel*.pt)"
)


def sha256_of(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def check_exists(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint file: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; give the checkpoint file inside it")
    return p


def _not_misnamed(path: Path, kind: str) -> str:
    """``kind``, unless a torch.save/pickle file is named ``*.safetensors`` (torch.load would
    then hand it to the safetensors parser, which fails with an obscure message)."""
    if path.suffix.lower() == ".safetensors":
        what = "a PyTorch zip (torch.save)" if kind == TORCH_ZIP else "a pickle (torch.save)"
        raise CheckpointError(
            f"{path.name} is named .safetensors but holds {what} file, not safetensors. "
            "If it is an official BerDiff/Wolleb state_dict, rename it to .pt and load it "
            "with its preset (it is read with weights_only=True); otherwise use the "
            ".safetensors file napari-berdiff wrote."
        )
    return kind


def sniff(path: str | Path) -> str:
    """Return :data:`SAFETENSORS`, :data:`TORCH_ZIP` or :data:`TORCH_LEGACY`.

    Raises
    ------
    CheckpointError
        For a missing, empty, truncated or unrecognisable file.
    """
    p = check_exists(path)
    size = p.stat().st_size
    if size == 0:
        raise corrupt(p, "it is empty: 0 bytes")
    with open(p, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return _not_misnamed(p, TORCH_ZIP)
    if len(head) == 9 and head[8:9] == b"{":
        # Before the pickle test: a header length such as 0x7980 starts with the byte 0x80.
        (n,) = struct.unpack("<Q", head[:8])
        if n <= size - 8:
            return SAFETENSORS
        if head[:1] != b"\x80":
            raise corrupt(p, f"its header announces {n} bytes but the file has {size}")
    if head[:1] == b"\x80":  # a pickle protocol marker
        return _not_misnamed(p, TORCH_LEGACY)
    if p.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        raise corrupt(p, f"it does not start like a {p.suffix} file")
    raise CheckpointError(
        f"{p.name} is not a checkpoint napari-berdiff can read; expected {EXPECTED}"
    )


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor table plus ``__metadata__``), cheaply."""
    p = Path(path)
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    if len(raw) != n:
        raise corrupt(p, "the header is cut short")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(p, f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise corrupt(p, "the header is not a table")
    return header
