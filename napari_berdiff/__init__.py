"""napari-berdiff: diffusion-model segmentation with uncertainty.

The engine (``diffusion``, ``networks``, ``uncertainty`` …) is free of Qt and napari;
everything that touches the GUI lives in ``napari_berdiff._qt``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # Imported lazily so that ``import napari_berdiff`` (done by napari when it reads
    # the manifest) stays cheap and does not import torch.
    if name == "load_model":
        from .checkpoints import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
