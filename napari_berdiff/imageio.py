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

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageSource",
    "open_image",
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


def _info(path: Path, fmt: str, arr: np.ndarray | Sequence[int], dtype: Any, axes: str,
          spacing: Sequence[float] | None = None, grey: bool = False, **extra: Any) -> dict:
    return {
        "path": str(path),
        "format": fmt,
        "shape": tuple(int(s) for s in getattr(arr, "shape", arr)),
        "dtype": str(dtype),
        "axes": axes,
        "spacing": None if spacing is None else tuple(float(s) for s in spacing),
        "converted_to_grey": grey,
        **extra,
    }


def _default_axes(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "?" * ndim)


# --------------------------------------------------------------------------- readers
Key = tuple[Any, ...]


class ImageSource:
    """A file's image, opened but not yet read.

    ``shape`` and ``info`` are known at once; :meth:`read` reads what a basic-indexing key
    selects (ints and slices, on the axes :func:`read_image` returns). For ``.npy`` files,
    uncompressed TIFFs (memory maps) and NIfTI files (nibabel's array proxy) only the
    selected part is read from disk, so a small region of a huge image costs little memory.
    """

    def __init__(self, path: Path, info: dict[str, Any], read: Any):
        self.path = path
        self.info = info
        self.shape: tuple[int, ...] = tuple(info["shape"])
        self._read = read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, key: Key = ()) -> np.ndarray:
        """The array (or the part ``key`` selects) as an in-memory numpy array."""
        key = tuple(key) + (slice(None),) * (self.ndim - len(key))
        with _errors_named(self.path, self.info["format"]):
            return np.asarray(self._read(key))


def _check_dtype(path: Path, dtype: Any, shape: Sequence[int]) -> None:
    """Refuse what would be silently wrong once converted: complex or non-numeric data, and
    empty arrays (before any conversion or reduction runs on them)."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise ValueError(f"{path.name} holds Python objects, not numbers; napari-berdiff "
                         "never loads pickled data. Save the image as a numeric array")
    if np.issubdtype(dt, np.complexfloating):
        raise ValueError(f"{path.name} holds complex numbers (dtype {dt}); save its "
                         "magnitude or real part (e.g. np.abs(a)) as a real array")
    if dt != bool and not np.issubdtype(dt, np.number):
        raise ValueError(f"{path.name} holds {dt} data, not numbers; save the image as a "
                         "numeric array")
    if 0 in tuple(shape):
        raise ValueError(f"{path.name} holds an empty array of shape {tuple(shape)}: "
                         "there is no image in it")


def _grey_reader(data: Any) -> Any:
    """A reader of an (H, W, 3|4) source by (y, x) key that converts the selection to grey."""
    def read(key: Key) -> np.ndarray:
        part = np.asarray(data[tuple(key[:2]) + (slice(None),)])
        return (part[..., :3].astype(np.float64) @ LUMINANCE).astype(np.float32)

    return read


def _open_pillow(path: Path) -> ImageSource:
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
    _check_dtype(path, arr.dtype, arr.shape)
    return ImageSource(path, _info(path, "pillow", arr, dtype, "YX", grey=grey, mode=mode),
                       arr.__getitem__)


def _open_tiff(path: Path) -> ImageSource:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape, dtype = series.axes, tuple(series.shape), series.dtype
        photometric = getattr(tif.pages[0], "photometric", None)
        mappable = getattr(series, "dataoffset", None) is not None
    _check_dtype(path, dtype, shape)
    # Uncompressed, contiguous data is memory-mapped (only what is indexed is read); other
    # TIFFs (compressed, tiled) are read whole when first indexed.
    if mappable:
        data: Any = tifffile.memmap(path, series=0, mode="r")
    else:
        data = _Deferred(lambda: tifffile.imread(path, series=0), shape)
    if min(shape) == 1 and len(shape) > 2:
        data = _Squeezed(data, shape)
        shape = data.shape
    rgb = photometric is not None and getattr(photometric, "name", "") == "RGB"
    grey = len(shape) == 3 and (rgb or _looks_rgb_shape(shape)) and shape[-1] in (3, 4)
    if grey:
        read, shape = _grey_reader(data), shape[:2]
    else:
        read = data.__getitem__
    if len(shape) == 3:
        out_axes = "CYX" if axes.upper().startswith("C") else "ZYX"
    else:
        out_axes = _default_axes(len(shape))
    return ImageSource(path, _info(path, "tiff", shape, dtype, out_axes, grey=grey), read)


def _looks_rgb_shape(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4


def _looks_rgb(arr: np.ndarray) -> bool:
    return _looks_rgb_shape(arr.shape)


class _Deferred:
    """An array read whole on first indexing (formats that cannot be read in parts)."""

    def __init__(self, load: Any, shape: Sequence[int]):
        self._load, self._arr, self.shape = load, None, tuple(shape)

    def __getitem__(self, key: Key) -> np.ndarray:
        if self._arr is None:
            self._arr = np.asarray(self._load())
        return self._arr[key]


class _Squeezed:
    """A view of ``data`` without its length-1 axes, indexed lazily."""

    def __init__(self, data: Any, shape: Sequence[int]):
        self._data, self._full = data, tuple(shape)
        self.shape = tuple(n for n in shape if n != 1)

    def __getitem__(self, key: Key) -> np.ndarray:
        it = iter(tuple(key) + (slice(None),) * (len(self.shape) - len(key)))
        return np.asarray(self._data[tuple(0 if n == 1 else next(it) for n in self._full)])


def _open_npy(path: Path) -> ImageSource:
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path.name} is not a NumPy .npy file (it lacks the .npy "
                             "header); save the image with numpy.save")
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        text = str(e)
        if "object" in text.lower() or "pickle" in text.lower():
            raise ValueError(f"{path.name} holds Python objects (pickled data), not numbers; "
                             "napari-berdiff never loads pickled data. Save the image as a "
                             "numeric array") from None
        if "mmap length" in text or "not fully written" in text:
            raise ValueError(f"{path.name} is truncated: its header announces "
                             "more data than the file holds. Copy or save it again") from None
        raise
    _check_dtype(path, data.dtype, data.shape)
    dtype, shape = data.dtype, tuple(data.shape)
    grey = _looks_rgb_shape(shape)
    if grey:
        read, shape = _grey_reader(data), shape[:2]
    else:
        read = data.__getitem__
    return ImageSource(path, _info(path, "numpy", shape, dtype, _default_axes(len(shape)),
                                   grey=grey), read)


def _open_nifti(path: Path) -> ImageSource:
    import nibabel as nib

    img = nib.load(str(path))
    dtype = img.get_data_dtype()
    proxy = img.dataobj
    file_shape = tuple(int(n) for n in proxy.shape)
    _check_dtype(path, dtype, file_shape)
    if not str(path).lower().endswith(".gz"):
        need = int(img.header.get_data_offset()) + math.prod(file_shape) * np.dtype(
            dtype).itemsize
        have = path.stat().st_size
        if have < need:
            raise ValueError(
                f"{path.name} is truncated or its header is wrong: the header announces "
                f"{'×'.join(map(str, file_shape))} voxels of {np.dtype(dtype)} "
                f"({need / 1e9:.3g} GB) but the file holds {have:,} bytes"
            )
    zooms = tuple(float(z) for z in img.header.get_zooms()[: len(file_shape)])
    # Drop trailing singleton voxel axes (a 2D slice stored as X×Y×1).
    kept = len(file_shape)
    while kept > 2 and file_shape[kept - 1] == 1:
        kept -= 1
    shape = file_shape[:kept][::-1]

    def read(key: Key) -> np.ndarray:
        # Our axes are the file's reversed: index the proxy (which reads only that part,
        # scaled by scl_slope/scl_inter) with the reversed key, then reverse the result.
        part = np.asarray(proxy[tuple(key[::-1]) + (0,) * (len(file_shape) - kept)],
                          dtype=np.float32)
        return np.ascontiguousarray(part.transpose(tuple(range(part.ndim))[::-1]))

    return ImageSource(path, _info(path, "nifti", shape, dtype, _default_axes(len(shape)),
                                   spacing=zooms[:kept][::-1],
                                   affine=np.asarray(img.affine).round(6).tolist()), read)


def _open_dicom(path: Path) -> ImageSource:
    """A DICOM file, or a folder holding one series (:mod:`napari_berdiff.dicom_io`); a
    colour (RGB) file is read as grey."""
    import pydicom

    if path.is_file():
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - dicom_io names the problem below
            ds = None
        if ds is not None and int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
            return _open_dicom_colour(path)
    from .dicom_io import read_dicom_volume

    vol = read_dicom_volume(path)
    arr, spacing = vol.array, vol.spacing
    if arr.shape[0] == 1:
        arr, spacing = arr[0], spacing[1:]
    _check_dtype(path, arr.dtype, arr.shape)
    axes = "YX" if arr.ndim == 2 else "ZYX"
    return ImageSource(path, _info(path, "dicom", arr, "float32", axes, spacing=spacing,
                                   modality=vol.modality, units=vol.units,
                                   dicom=vol.metadata()), arr.__getitem__)


def _open_dicom_colour(path: Path) -> ImageSource:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        raw = ds.pixel_array
    except Exception as e:  # InvalidDicomError, missing pixel data, unsupported compression
        reason = str(e).strip() or type(e).__name__
        raise ValueError(f"cannot read the DICOM file {path.name}: {reason}") from None
    _check_dtype(path, raw.dtype, raw.shape)
    arr = to_grey(raw)
    spacing = None
    ps = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    if ps is not None and len(ps) == 2:
        spacing = [float(ps[0]), float(ps[1])]
    return ImageSource(path, _info(path, "dicom", arr, raw.dtype, "YX", spacing=spacing,
                                   grey=True, modality=str(getattr(ds, "Modality", "")),
                                   photometric=str(getattr(ds, "PhotometricInterpretation",
                                                           ""))), arr.__getitem__)


_OPENERS = {
    "pillow": _open_pillow,
    "tiff": _open_tiff,
    "numpy": _open_npy,
    "nifti": _open_nifti,
    "dicom": _open_dicom,
}


@contextmanager
def _errors_named(path: Path, fmt: str) -> Iterator[None]:
    """Turn a reader's failure into a ``ValueError`` that names the file and says why."""
    try:
        yield
    except ValueError as e:
        text = str(e).strip() or type(e).__name__
        raise ValueError(text if path.name in text else f"{path.name}: {text}") from None
    except ImportError as e:
        raise ValueError(f"reading {path.name} needs an extra package: {e}") from None
    except MemoryError:
        raise ValueError(f"{path.name} is too large to read into memory; read a region of "
                         "it (--roi) or a slice (--slice)") from None
    except Exception as e:  # noqa: BLE001 - format libraries raise many kinds of errors
        reason = str(e).strip() or type(e).__name__
        raise ValueError(f"cannot read {path.name} as {fmt}: {reason} "
                         f"({type(e).__name__}); the file is damaged or not a {fmt} "
                         "file") from None


def open_image(path: str | Path) -> ImageSource:
    """Open an image file without reading its pixels (see :class:`ImageSource`).

    Raises
    ------
    ValueError
        For a missing file, an unsupported extension (listing the supported ones), data
        that is not real numbers or is empty, or a file its reader cannot parse; the
        message names the file.
    """
    p = Path(path)
    if p.is_dir():  # a folder is read as one DICOM series
        with _errors_named(p, "dicom"):
            return _open_dicom(p)
    if not p.is_file():
        raise ValueError(f"no such image file: {p}")
    suffix = _suffix(p)
    for fmt, suffixes in IMAGE_SUFFIXES.items():
        if suffix in suffixes:
            with _errors_named(p, fmt):
                return _OPENERS[fmt](p)
    raise ValueError(
        f"cannot read {p.name}: unsupported file type {suffix or '(no extension)'!r}; "
        f"supported: {_supported()}"
    )


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image file; see the module docstring for axis orders and ``info``.

    Raises
    ------
    ValueError
        As :func:`open_image`, and for a file whose data cannot be read.
    """
    src = open_image(path)
    return src.read(), src.info


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
