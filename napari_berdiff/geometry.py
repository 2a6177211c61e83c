"""The geometry that layers made from an image inherit from it (no Qt, no napari).

A layer opened from a NIfTI file carries its affine in ``metadata["nifti"]`` (file axis
order, see :mod:`napari_berdiff._nifti_io`); one opened from DICOM carries its series'
identity and affine in ``metadata["dicom"]`` (napari axis order, patient LPS millimetres,
see :mod:`napari_berdiff.dicom_io`). A result, accepted or refined layer covers part of that
image (a region, one slice, or all of it) and may have leading axes of its own (the sample
axis). :func:`derived_metadata` gives such a layer the source's geometry moved to where the
layer sits, so that the writers put it back in the same place in the world:

- ``nifti``: the affine shifted by the region's start and the file shape of the new layer;
- ``dicom``: the series' identity and affine, plus ``region`` (the spatial start and shape
  within the series) and ``leading`` (the number of leading non-spatial axes).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: metadata keys that hold a source image's geometry
GEOMETRY_KEYS = ("nifti", "dicom")


def source_geometry(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The geometry entries of an image layer's metadata (a deep copy; empty if none)."""
    meta = metadata or {}
    return {k: copy.deepcopy(meta[k]) for k in GEOMETRY_KEYS if isinstance(meta.get(k), dict)}


def _shifted(affine: Sequence[Sequence[float]], start_xyz: Sequence[int]) -> np.ndarray:
    a = np.array(affine, dtype=np.float64)
    n = min(3, len(start_xyz))
    a[:3, 3] = a[:3, 3] + a[:3, :n] @ np.asarray(start_xyz[:n], dtype=np.float64)
    return a


def derived_metadata(geometry: Mapping[str, Any], start: Sequence[int],
                     data_shape: Sequence[int]) -> dict[str, Any]:
    """Metadata entries for a layer of shape ``data_shape`` whose last ``len(start)`` axes
    cover the source image's spatial axes from ``start`` on.

    Axes before those (a sample axis) are leading axes of the new layer only.
    """
    start = [int(s) for s in start]
    shape = [int(s) for s in data_shape]
    nd = len(start)
    lead = len(shape) - nd
    if lead < 0:
        raise ValueError(f"a layer of shape {tuple(shape)} cannot cover {nd} spatial axes")
    out: dict[str, Any] = {}
    nifti = geometry.get("nifti")
    if isinstance(nifti, Mapping) and nifti.get("affine") is not None:
        src_shape = list(nifti.get("shape") or [])
        if len(src_shape) >= nd:
            new = dict(copy.deepcopy(nifti))
            new["affine"] = _shifted(nifti["affine"], start[::-1]).tolist()
            new["shape"] = shape[::-1]
            zooms = list(nifti.get("zooms") or [])[:nd]
            new["zooms"] = zooms + [1.0] * lead if len(zooms) == nd else zooms
            new["derived_from"] = nifti.get("source", "")
            out["nifti"] = new
    dicom = geometry.get("dicom")
    if isinstance(dicom, Mapping):
        new = dict(copy.deepcopy(dicom))
        full = list(dicom.get("shape") or [])
        sp_start = ([0] * (len(full) - nd) + start) if len(full) > nd else start
        sp_shape = shape[lead:]
        if len(full) > nd:  # a 2D layer of a one-slice series
            sp_shape = [1] * (len(full) - nd) + sp_shape
        new["region"] = {"start": sp_start, "shape": sp_shape}
        new["leading"] = lead
        out["dicom"] = new
    return out


def layer_affine(layer: Any, nd: int) -> list[list[float]] | None:
    """The spatial part of a napari layer's own ``affine`` (beyond scale and translate),
    or None when it is the identity."""
    try:
        matrix = np.asarray(layer.affine.affine_matrix, dtype=np.float64)
    except AttributeError:
        return None
    sub = matrix[-nd - 1:, -nd - 1:]
    return None if np.allclose(sub, np.eye(nd + 1)) else sub.tolist()


def expand_affine(matrix: Sequence[Sequence[float]], ndim: int) -> np.ndarray:
    """A spatial affine extended with identity rows and columns for leading axes."""
    m = np.asarray(matrix, dtype=np.float64)
    nd = m.shape[0] - 1
    out = np.eye(ndim + 1)
    out[ndim - nd:, ndim - nd:] = m
    return out


def _dicom_region(dicom: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    full = [int(s) for s in dicom.get("shape") or []]
    region = dicom.get("region") or {}
    start = [int(s) for s in region.get("start") or [0] * len(full)]
    shape = [int(s) for s in region.get("shape") or full]
    return start, shape


def dicom_nifti_affine(dicom: Mapping[str, Any], file_shape: Sequence[int]) -> np.ndarray | None:
    """The NIfTI (RAS, file axis order) affine of a layer with ``metadata["dicom"]``, or
    None when the layer's shape does not match the region it records."""
    aff = dicom.get("affine")
    if aff is None:
        return None
    start, shape = _dicom_region(dicom)
    lead = int(dicom.get("leading", 0) or 0)
    spatial = list(file_shape)[: len(file_shape) - lead][::-1]  # napari order
    squeezed = [s for s in shape if s != 1] if len(spatial) < len(shape) else shape
    if spatial != shape and spatial != squeezed:
        return None
    a = _shifted(aff, start)  # napari (k, r, c) -> LPS
    file_aff = np.eye(4)  # file axes (c, r, k); a 2D layer's file is (c, r)
    file_aff[:3, :3] = a[:3, :3][:, [2, 1, 0]]
    file_aff[:3, 3] = a[:3, 3]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ file_aff  # LPS -> RAS
