"""npe2 reader and writers for NIfTI images and label maps (``.nii`` / ``.nii.gz``).

No Qt here, only nibabel (imported when a file is read or written).

Axes: NIfTI stores voxels as (i, j, k[, t]); napari layers show the last two axes and slide
over the first ones, so the reader reverses the axes, giving (k, j, i) — axial slices on the
slider for the usual RAS/LPS volumes — and sets ``scale`` to the voxel sizes in that order.
The file's affine and header fields travel in ``metadata["nifti"]``; the writer reverses
the axes back and reuses that affine, so a read-then-write round trip keeps the geometry.
Layers the plugin makes over such an image (results, accepted masks) carry the affine moved
to where they sit (:mod:`napari_berdiff.geometry`); layers over a DICOM series get the
series' affine in RAS. Files without any get an affine built from ``scale`` and
``translate``. A layer that records its provenance (accepted masks) also gets a JSON
sidecar, ``<name>.provenance.json``.

Label maps: a file is opened as a Labels layer when its header says so (intent
``NIFTI_INTENT_LABEL``, which our label writer sets), when its name looks like a
segmentation (``seg``, ``label``, ``mask``, ``gt``, ``annot``) and it holds integers, or when
it holds a few small non-negative integers only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

EXTENSIONS = (".nii", ".nii.gz")
INTENT_LABEL = 1002  # NIFTI_INTENT_LABEL
_LABEL_NAME = re.compile(r"(seg|label|mask|gt|annot)", re.IGNORECASE)
_MAX_AUTO_LABELS = 64

LayerData = tuple[Any, dict[str, Any], str]


def _is_nifti(path: str) -> bool:
    return isinstance(path, str) and path.lower().endswith(EXTENSIONS)


def get_reader(path: str | list[str]) -> Any:
    """npe2 reader contribution: a reader function for NIfTI paths, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(_is_nifti(str(p)) for p in paths):
        return None
    return read_nifti


def _looks_like_labels(arr: np.ndarray, path: str, intent: int) -> bool:
    if intent == INTENT_LABEL:
        return True
    if arr.dtype.kind not in "iub":
        return False
    if arr.size == 0:
        return False
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        return False
    name = Path(path).name
    if _LABEL_NAME.search(name.split(".")[0]):
        return True
    if hi >= _MAX_AUTO_LABELS:
        return False
    return len(np.unique(arr)) <= _MAX_AUTO_LABELS


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def read_nifti(path: str | list[str]) -> list[LayerData]:
    """Read one or more NIfTI files as napari layer data."""
    import nibabel as nib

    paths = [path] if isinstance(path, str) else list(path)
    out: list[LayerData] = []
    for p in paths:
        img = nib.load(str(p))
        header = img.header
        slope, inter = header.get_slope_inter()
        scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
        arr = np.asarray(img.get_fdata(dtype=np.float32) if scaled else img.dataobj)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        ndim = arr.ndim
        data = np.ascontiguousarray(np.transpose(arr, tuple(range(ndim))[::-1]))
        zooms = [float(z) if z > 0 else 1.0 for z in header.get_zooms()[:ndim]]
        scale = tuple(zooms[::-1])
        intent = int(header["intent_code"])
        meta = {
            "nifti": {
                "affine": np.asarray(img.affine, dtype=np.float64).tolist(),
                "zooms": zooms,
                "shape": [int(s) for s in arr.shape],
                "xyzt_units": [str(u) for u in header.get_xyzt_units()],
                "qform_code": int(header["qform_code"]),
                "sform_code": int(header["sform_code"]),
                "intent_code": intent,
                "source": str(p),
            }
        }
        kwargs: dict[str, Any] = {"name": _stem(str(p)), "scale": scale, "metadata": meta}
        if _looks_like_labels(arr, str(p), intent):
            if data.dtype == np.bool_ or data.dtype.kind == "f":
                data = data.astype(np.uint8)
            out.append((data, kwargs, "labels"))
        else:
            out.append((data, kwargs, "image"))
    return out


def _affine_for(attributes: dict[str, Any], file_shape: tuple[int, ...]) -> np.ndarray:
    metadata = attributes.get("metadata") or {}
    meta = metadata.get("nifti") or {}
    aff = meta.get("affine")
    if aff is not None and list(meta.get("shape", [])) == list(file_shape):
        return np.asarray(aff, dtype=np.float64)
    dicom = metadata.get("dicom")
    if isinstance(dicom, dict):  # a layer from (or made over) a DICOM series
        from .geometry import dicom_nifti_affine

        aff = dicom_nifti_affine(dicom, file_shape)
        if aff is not None:
            return aff
    ndim = len(file_shape)
    scale = list(attributes.get("scale") or [1.0] * ndim)[::-1]
    translate = list(attributes.get("translate") or [0.0] * ndim)[::-1]
    affine = np.eye(4)
    for i in range(min(3, ndim)):
        affine[i, i] = float(scale[i])
        affine[i, 3] = float(translate[i])
    return affine


def _nifti_path(path: str) -> str:
    return path if _is_nifti(path) else path + ".nii.gz"


def _write(path: str, data: Any, attributes: dict[str, Any], labels: bool) -> list[str]:
    import nibabel as nib

    path = _nifti_path(str(path))
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif labels and arr.dtype.kind in "iu":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for dt in (np.uint8, np.uint16, np.int32, np.int64):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                arr = arr.astype(dt, copy=False)
                break
    file_arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])
    affine = _affine_for(attributes, tuple(file_arr.shape))
    img = nib.Nifti1Image(np.ascontiguousarray(file_arr), affine)
    header = img.header
    meta = (attributes.get("metadata") or {}).get("nifti") or {}
    units = meta.get("xyzt_units")
    if units:
        try:
            header.set_xyzt_units(*units)
        except Exception:  # noqa: BLE001 - unknown unit names: keep the default
            pass
    zooms = list(attributes.get("scale") or [])[::-1]
    if len(zooms) == file_arr.ndim:
        header.set_zooms([abs(float(z)) or 1.0 for z in zooms])
    codes = (int(meta.get("qform_code", 1) or 1), int(meta.get("sform_code", 1) or 1))
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    if labels:
        header.set_intent("label")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    written = [path]
    sidecar = _write_provenance(path, np.asarray(data), attributes)
    if sidecar:
        written.append(sidecar)
    return written


def _write_provenance(path: str, data: np.ndarray, attributes: dict[str, Any]) -> str | None:
    """``<name>.provenance.json`` beside ``path`` when the layer records how it was made."""
    from .provenance import provenance_document

    doc = provenance_document(attributes.get("metadata") or {}, data)
    if doc is None:
        return None
    import json

    side = str(Path(path).with_name(_stem(path) + ".provenance.json"))
    Path(side).write_text(json.dumps(doc, indent=2) + "\n")
    return side


def write_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer for an Image layer."""
    return _write(path, data, attributes, labels=False)


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer for a Labels layer (sets the NIfTI label intent)."""
    return _write(path, data, attributes, labels=True)
