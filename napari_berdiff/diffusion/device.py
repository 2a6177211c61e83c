"""Choosing the torch device: cuda, then mps, then cpu."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """Device names usable on this machine, best first, always ending with ``"cpu"``."""
    out = []
    if torch.cuda.is_available():
        out.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    out.append("cpu")
    return out


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``"auto"`` (or ``None``) to the best available device and check others.

    Raises
    ------
    ValueError
        If the requested device is not available here, naming the ones that are.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device(available_devices()[0])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {str(device)!r}; choose one of {['auto', *available_devices()]}"
        ) from None
    if dev.type not in available_devices():
        raise ValueError(
            f"device {str(device)!r} is not available on this machine; "
            f"choose one of {['auto', *available_devices()]}"
        )
    return dev
