"""Reading images and writing masks and maps for the ``berdiff`` command line.

Engine module: numpy plus the format libraries (Pillow, tifffile, nibabel, pydicom), each
imported only when its format is used. No Qt, no napari, no torch.

Readers return ``(array, info)``. The array keeps the file's values (no intensity
normalisation: :meth:`DiffusionModel.prepare` applies the model's own), in these axis orders:

=====================  ===============================================================
PNG / JPEG / BMP       ``(Y, X)``; RGB(A) becomes grey (luminance) with
                       ``info["converted_to_grey"] = True``
TIFF                   as stored: ``(Y, X)``, ``(Z, Y, X)`` or ``(C, Y, X)``; RGB(A) → grey
NumPy ``.npy``         as stored; an ``(H, W, 3|4)`` array is taken as RGB(A) → grey
NIfTI ``.nii(.gz)``    ``(Z, Y, X)``: the voxel axes reversed (``data.transpose(2, 1, 0)``),
                       so ``array[k]`` is the k-th slice along the file's third voxel axis,
                       rows follow the second voxel axis and columns the first. The scaling
                       (``scl_slope``/``scl_inter``) is applied; no reorientation to RAS.
DICOM ``.dcm``,        ``(Y, X)`` for one slice, else ``(Z, Y, X)``: a multi-frame file or
a DICOM folder         a folder's series, slices sorted along the normal, the modality
                       transform applied (CT in Hounsfield units, ``info["units"] == "HU"``);
                       ``info["dicom"]`` holds the geometry (:mod:`napari_berdiff.dicom_io`)
=====================  ===============================================================

``info`` holds ``path``, ``format``, ``shape``, ``dtype`` (of the file's data), ``axes``
(e.g. ``"YX"``, ``"ZYX"``), ``spacing`` (per axis of ``array``, in mm for NIfTI/DICOM, or
None when unknown) and ``converted_to_grey``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "read_image",
    "to_grey",
    "write_mask",
    "write_map",
    "write_array",
]

#: Supported suffixes, lower case, by reader.
IMAGE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "pillow": (".png", ".jpg", ".jpeg", ".bmp"),
    "tiff": (".tif", ".tiff"),
    "numpy": (".npy",),
    "nifti": (".nii", ".nii.gz"),
    "dicom": (".dcm", ".dicom"),
}

#: Luminance weights (ITU-R BT.709, as ``skimage.color.rgb2gray``).
LUMINANCE = np.array([0.2125, 0.7154, 0.0721], dtype=np.float64)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _supported() -> str:
    return ", ".join(s for group in IMAGE_SUFFIXES.values() for s in group)


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """Luminance of an ``(H, W, 3|4)`` array (alpha ignored), as float32 in the input's range."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) or (H, W, 4) colour image, got {arr.shape}")
    return (arr[..., :3].astype(np.float64) @ LUMINANCE).astype(np.float32)


def _looks_rgb(arr: np.ndarray) -> bool:
    return arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4


def _info(path: Path, fmt: str, arr: np.ndarray, dtype: Any, axes: str,
          spacing: Sequence[float] | None = None, grey: bool = False, **extra: Any) -> dict:
    return {
        "path": str(path),
        "format": fmt,
        "shape": tuple(int(s) for s in arr.shape),
        "dtype": str(dtype),
        "axes": axes,
        "spacing": None if spacing is None else tuple(float(s) for s in spacing),
        "converted_to_grey": grey,
        **extra,
    }


def _default_axes(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "?" * ndim)


# --------------------------------------------------------------------------- readers
def _read_pillow(path: Path) -> tuple[np.ndarray, dict]:
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("LA", "PA"):
            im = im.convert("L") if mode == "LA" else im.convert("RGBA")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.array(im)
    dtype = arr.dtype
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    grey = arr.ndim == 3
    if grey:
        arr = to_grey(arr)
    return arr, _info(path, "pillow", arr, dtype, "YX", grey=grey, mode=mode)


def _read_tiff(path: Path) -> tuple[np.ndarray, dict]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr = series.asarray()
        axes = series.axes
        photometric = getattr(tif.pages[0], "photometric", None)
    dtype = arr.dtype
    arr = np.squeeze(arr) if min(arr.shape) == 1 and arr.ndim > 2 else arr
    rgb = photometric is not None and getattr(photometric, "name", "") == "RGB"
    grey = False
    if arr.ndim == 3 and (rgb or _looks_rgb(arr)) and arr.shape[-1] in (3, 4):
        arr, grey = to_grey(arr), True
    if arr.ndim == 3:
        out_axes = "CYX" if axes.upper().startswith("C") else "ZYX"
    else:
        out_axes = _default_axes(arr.ndim)
    return arr, _info(path, "tiff", arr, dtype, out_axes, grey=grey)


def _read_npy(path: Path) -> tuple[np.ndarray, dict]:
    arr = np.load(path, allow_pickle=False)
    dtype = arr.dtype
    grey = False
    if _looks_rgb(arr):
        arr, grey = to_grey(arr), True
    return arr, _info(path, "numpy", arr, dtype, _default_axes(arr.ndim), grey=grey)


def _read_nifti(path: Path) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    img = nib.load(str(path))
    dtype = img.get_data_dtype()
    data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    # Drop trailing singleton voxel axes (a 2D slice stored as X×Y×1).
    while data.ndim > 2 and data.shape[-1] == 1:
        data, zooms = data[..., 0], zooms[:-1]
    arr = np.ascontiguousarray(data.transpose(tuple(range(data.ndim))[::-1]))
    return arr, _info(path, "nifti", arr, dtype, _default_axes(arr.ndim), spacing=zooms[::-1],
                      affine=np.asarray(img.affine).round(6).tolist())


def _read_dicom(path: Path) -> tuple[np.ndarray, dict]:
    """A DICOM file, or a folder holding one series (:mod:`napari_berdiff.dicom_io`)."""
    import pydicom

    if path.is_file():
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - dicom_io names the problem below
            ds = None
        if ds is not None and int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
            return _read_dicom_colour(path)
    from .dicom_io import read_dicom_volume

    vol = read_dicom_volume(path)
    arr, spacing = vol.array, vol.spacing
    if arr.shape[0] == 1:
        arr, spacing = arr[0], spacing[1:]
    axes = "YX" if arr.ndim == 2 else "ZYX"
    return arr, _info(path, "dicom", arr, "float32", axes, spacing=spacing,
                      modality=vol.modality, units=vol.units, dicom=vol.metadata())


def _read_dicom_colour(path: Path) -> tuple[np.ndarray, dict]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        raw = ds.pixel_array
    except Exception as e:  # InvalidDicomError, missing pixel data, unsupported compression
        raise ValueError(f"cannot read the DICOM file {path.name}: {e}") from None
    arr = to_grey(raw)
    spacing = None
    ps = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    if ps is not None and len(ps) == 2:
        spacing = [float(ps[0]), float(ps[1])]
    return arr, _info(path, "dicom", arr, raw.dtype, "YX", spacing=spacing, grey=True,
                      modality=str(getattr(ds, "Modality", "")),
                      photometric=str(getattr(ds, "PhotometricInterpretation", "")))


_READERS = {
    "pillow": _read_pillow,
    "tiff": _read_tiff,
    "numpy": _read_npy,
    "nifti": _read_nifti,
    "dicom": _read_dicom,
}


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image file; see the module docstring for axis orders and ``info``.

    Raises
    ------
    ValueError
        For a missing file, an unsupported extension (listing the supported ones) or a
        file its reader cannot parse.
    """
    p = Path(path)
    if p.is_dir():
        return _read_dicom(p)  # a folder is read as one DICOM series
    if not p.is_file():
        raise ValueError(f"no such image file: {p}")
    suffix = _suffix(p)
    for fmt, suffixes in IMAGE_SUFFIXES.items():
        if suffix in suffixes:
            try:
                return _READERS[fmt](p)
            except ValueError:
                raise
            except ImportError as e:
                raise ValueError(f"reading {suffix} files needs an extra package: {e}") from None
            except Exception as e:
                raise ValueError(f"cannot read {p.name} as {fmt}: {e}") from None
    raise ValueError(
        f"cannot read {p.name}: unsupported file type {suffix or '(no extension)'!r}; "
        f"supported: {_supported()}"
    )


# --------------------------------------------------------------------------- writers
_WRITE_SUFFIXES = (".npy", ".tif", ".tiff", ".png")


def _base(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix.lower() in _WRITE_SUFFIXES else p


def write_array(base: str | Path, array: np.ndarray, preview: np.ndarray | None = None,
                formats: Sequence[str] = ("npy", "tif", "png")) -> list[Path]:
    """Write ``array`` as ``base.npy`` and ``base.tif`` and ``preview`` (uint8) as ``base.png``."""
    from PIL import Image

    b = _base(base)
    out = []
    arr = np.ascontiguousarray(array)
    if "npy" in formats:
        np.save(b.with_suffix(".npy"), arr)
        out.append(b.with_suffix(".npy"))
    if "tif" in formats:
        import tifffile

        tifffile.imwrite(b.with_suffix(".tif"), arr)
        out.append(b.with_suffix(".tif"))
    if "png" in formats and preview is not None:
        if preview.ndim != 2:
            raise ValueError(f"a PNG preview must be 2D, got shape {preview.shape}")
        Image.fromarray(np.ascontiguousarray(preview, dtype=np.uint8)).save(b.with_suffix(".png"))
        out.append(b.with_suffix(".png"))
    return out


def write_mask(base: str | Path, mask: np.ndarray,
               formats: Sequence[str] = ("npy", "tif", "png")) -> list[Path]:
    """Write a binary mask: ``.npy``/``.tif`` as uint8 0/1, the ``.png`` preview as 0/255."""
    m = (np.asarray(mask) > 0).astype(np.uint8)
    return write_array(base, m, m * np.uint8(255), formats)


def write_map(base: str | Path, values: np.ndarray, name: str | None = None,
              limits: tuple[float, float] | None = None,
              formats: Sequence[str] = ("npy", "tif", "png")) -> list[Path]:
    """Write a float map: ``.npy``/``.tif`` as float32, a ``.png`` preview scaled to 0–255.

    The preview uses fixed contrast limits: ``limits``, else
    :data:`napari_berdiff.uncertainty.MAP_LIMITS` for ``name`` (default: the file's stem),
    else the map's own minimum and maximum.
    """
    from .uncertainty import MAP_LIMITS

    v = np.asarray(values, dtype=np.float32)
    key = name or _base(base).name
    lo, hi = limits or MAP_LIMITS.get(key, (float(np.nanmin(v)), float(np.nanmax(v))))
    scale = (hi - lo) if hi > lo else 1.0
    scaled = np.clip((np.nan_to_num(v, nan=lo) - lo) / scale, 0, 1)
    preview = np.round(scaled * 255).astype(np.uint8)
    return write_array(base, v, preview if v.ndim == 2 else None, formats)
