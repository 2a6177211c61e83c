"""Checkpoints: our ``.safetensors`` format and safe import of official ``.pt`` files (DESIGN §5).

Public API
----------
- :func:`load_model` — any supported file to a :class:`~napari_berdiff.model.DiffusionModel`
- :func:`save_model` — write our format
- :func:`describe` — what a file is (``berdiff info``)
- :func:`sha256_of`, :func:`list_bundled_models`
- :func:`recognise_preset`, :func:`matching_presets`, :func:`read_torch_state_dict`
- :class:`CheckpointError` — a ``ValueError`` with a message for people; its subclass
  :class:`PresetRequired` when an official file's preset must be named

Nothing here imports Qt or napari, and nothing executes code from a file.
"""

from __future__ import annotations

from .errors import CheckpointError, PresetRequired
from .info import describe, list_bundled_models
from .loading import load_model, load_state_dict_file
from .official import matching_presets, read_torch_state_dict, recognise_preset, strip_prefixes
from .ours import FORMAT, METADATA_KEY, read_description, save_model
from .sniff import sha256_of

__all__ = [
    "FORMAT",
    "METADATA_KEY",
    "CheckpointError",
    "PresetRequired",
    "describe",
    "list_bundled_models",
    "load_model",
    "load_state_dict_file",
    "matching_presets",
    "read_description",
    "read_torch_state_dict",
    "recognise_preset",
    "save_model",
    "sha256_of",
    "strip_prefixes",
]
