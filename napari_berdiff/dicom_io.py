"""Reading DICOM series into volumes with their geometry, and the npe2 DICOM reader.

Engine module: pydicom (and highdicom for enhanced multi-frame files), imported when used.
No Qt, no napari, no torch.

What a series becomes
---------------------
A :class:`DicomVolume`: a ``(Z, Y, X)`` float32 array, rows and columns as stored, slices
sorted by ``ImagePositionPatient`` projected on the slice normal (the cross product of the
two ``ImageOrientationPatient`` direction cosines), ascending; never by file name or
``InstanceNumber``. Values go through the modality transform (``RescaleSlope`` /
``RescaleIntercept`` or a modality LUT), so CT is in Hounsfield units (``units == "HU"``).
``spacing`` is ``(slice step along the normal, PixelSpacing row, PixelSpacing column)`` in
mm, and ``affine`` maps an index ``(k, r, c)`` to patient coordinates (DICOM LPS, mm).

Errors
------
Every problem raises a :class:`DicomReadError` (a ``ValueError``) subclass that names the
file and says what to do: :class:`NotAnImageError` (RT plans, structured reports …),
:class:`TruncatedFileError`, :class:`UnsupportedCompressionError` (naming the transfer syntax
and the package that would decode it), :class:`MixedSeriesError` (slices that do not form one
volume) and :class:`IrregularSpacingError`. A read either returns every series whole or
raises: nothing is opened half-way.

Compressed transfer syntaxes decode through pydicom's plugins: RLE (pydicom itself), JPEG
baseline and JPEG 2000 (Pillow), JPEG-LS (pyjpegls, a highdicom dependency), JPEG lossless
(python-gdcm, in the ``io`` extra). Not decoded by what we install: 12-bit JPEG extended
and HTJ2K (they need pylibjpeg with pylibjpeg-libjpeg, GPL-3.0, or pylibjpeg-openjpeg); the
error names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DicomReadError",
    "NotAnImageError",
    "TruncatedFileError",
    "UnsupportedCompressionError",
    "MixedSeriesError",
    "IrregularSpacingError",
    "DicomVolume",
    "read_dicom_volumes",
    "read_dicom_volume",
    "is_dicom_file",
    "get_reader",
    "read_dicom_layers",
    "META_KEY",
]

#: layer metadata key for a DICOM layer's geometry and identity
META_KEY = "dicom"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: relative tolerance on slice steps before a series is called irregular
SPACING_RTOL = 0.01
#: the SOP classes we refuse as "not an image" even though they carry pixel data
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class DicomReadError(ValueError):
    """A DICOM file or series that cannot be opened; the message names the file."""


class NotAnImageError(DicomReadError):
    """A DICOM object without image pixels (RT plan, structured report, …)."""


class TruncatedFileError(DicomReadError):
    """A file that ends before its header or its pixel data does."""


class UnsupportedCompressionError(DicomReadError):
    """Pixel data in a transfer syntax no installed package decodes."""


class MixedSeriesError(DicomReadError):
    """Slices of one series that do not form one volume (sizes, orientations, positions)."""


class IrregularSpacingError(DicomReadError):
    """Slices whose spacing along the normal varies (missing slices, several stacks)."""


@dataclass
class DicomVolume:
    """One series as a volume; see the module docstring for the conventions."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    orientation: tuple[float, ...]
    units: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    modality: str
    description: str
    series_number: int | None
    files: list[str]
    sop_instance_uids: list[str]
    multiframe: bool = False
    transfer_syntaxes: list[str] = field(default_factory=list)
    #: non-image objects (reports, plans, SEGs) found beside the series and not opened
    skipped: list[str] = field(default_factory=list)

    @property
    def origin(self) -> tuple[float, float, float]:
        """Patient position (LPS, mm) of the first voxel's centre."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def name(self) -> str:
        """A layer name: the series description, else the modality and series number."""
        if self.description.strip():
            return self.description.strip()
        number = "" if self.series_number is None else f" series {self.series_number}"
        return f"{self.modality or 'DICOM'}{number}".strip()

    def metadata(self) -> dict[str, Any]:
        """JSON-able identity and geometry for a napari layer's ``metadata[META_KEY]``."""
        return {
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "sop_class_uid": self.sop_class_uid,
            "modality": self.modality,
            "description": self.description,
            "units": self.units,
            "orientation": [float(v) for v in self.orientation],
            "origin": list(self.origin),
            "spacing": [float(v) for v in self.spacing],
            "affine": np.asarray(self.affine, dtype=np.float64).tolist(),
            "shape": [int(s) for s in self.array.shape],
            "files": list(self.files),
            "sop_instance_uids": list(self.sop_instance_uids),
            "multiframe": self.multiframe,
            "skipped_non_image": list(self.skipped),
        }


# --------------------------------------------------------------------------- files
def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a file with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _expand(paths: Iterable[str | Path]) -> tuple[list[Path], bool]:
    """The DICOM files of ``paths`` (folders searched recursively); whether any was a folder.

    Files given one by one must be DICOM files; inside folders, other files (READMEs,
    DICOMDIR indexes, thumbnails) are skipped.
    """
    files: list[Path] = []
    folder = False
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            folder = True
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR" \
                        and is_dicom_file(f):
                    files.append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise DicomReadError(f"no such file or folder: {p}")
    if not files:
        where = ", ".join(str(Path(p)) for p in paths)
        raise DicomReadError(f"no DICOM files found in {where}. Open a folder holding the "
                             "series' .dcm files, or the files themselves.")
    return files, folder


def _read_dataset(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        raise DicomReadError(
            f"{path.name} is not a DICOM file (no DICM preamble; an old ACR-NEMA file needs "
            "converting, e.g. with dcmconv). Open the series' .dcm files or their folder."
        ) from None
    except (EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise TruncatedFileError(
            f"{path.name} is truncated or damaged: its header cannot be read "
            f"({e or type(e).__name__}). Copy the file again from its source; nothing was "
            "opened."
        ) from None
    if "SOPClassUID" not in ds:  # type 1 in every object: the data set ended early
        raise TruncatedFileError(
            f"{path.name} is truncated or damaged: its data set ends before the SOP Class UID "
            "every DICOM object carries. Copy the file again from its source; nothing was "
            "opened."
        )
    return ds


def _sop_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    name = getattr(uid, "name", "") if uid is not None else ""
    return name or str(uid or "unknown SOP class")


def _check_image(path: Path, ds: Any) -> None:
    if str(ds.get("SOPClassUID", "")) == _SEG_CLASS:
        raise NotAnImageError(
            f"{path.name} is a DICOM Segmentation (SEG), not an image. Open the image series "
            "it refers to; SEG objects are read with highdicom (highdicom.seg.segread)."
        )
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotAnImageError(
            f"{path.name} is a {_sop_name(ds)} object with no image pixels; only image series "
            "(CT, MR, PET …) open as layers."
        )


def _decode(path: Path, ds: Any) -> np.ndarray:
    """The stored pixel values of ``ds`` (frames first), or a named error."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise UnsupportedCompressionError(
                f"{path.name} uses the transfer syntax {syntax.name} ({syntax}), which pydicom "
                "cannot decode. Convert the series to an uncompressed syntax (for example "
                "with dcmdjpeg or gdcmconv --raw)."
            ) from None
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
            raise UnsupportedCompressionError(
                f"{path.name} is compressed as {syntax.name}, which none of the installed "
                f"packages decodes. It needs: {needs}. Install one, or convert the series "
                "to an uncompressed syntax."
            )
    try:
        return np.asarray(ds.pixel_array)
    except (RuntimeError, NotImplementedError) as e:
        name = getattr(syntax, "name", str(syntax))
        raise UnsupportedCompressionError(
            f"{path.name} is compressed as {name}, which the installed packages cannot decode "
            f"here ({str(e).splitlines()[-1].strip()}). pylibjpeg with pylibjpeg-libjpeg decodes "
            "12-bit JPEG; or convert the series to an uncompressed syntax."
        ) from None
    except (ValueError, EOFError, OSError, AttributeError, KeyError) as e:
        raise TruncatedFileError(
            f"{path.name} is truncated or damaged: its pixel data cannot be read ({e}). "
            "Copy the file again from its source; nothing was opened."
        ) from None


def _rescale(path: Path, ds: Any, stored: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        raise DicomReadError(
            f"{path.name} is a colour ({ds.get('PhotometricInterpretation', 'RGB')}) image; "
            "the reader opens grey-level series only."
        )
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def _units(ds: Any) -> str:
    rescale_type = str(ds.get("RescaleType", "") or "").upper()
    if rescale_type == "HU" or str(ds.get("Modality", "")).upper() == "CT":
        return "HU"
    return rescale_type


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


# --------------------------------------------------------------------------- series
def _unit_normal(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return row, col, (n / norm if norm > 0 else np.array([0.0, 0.0, 1.0]))


def _same(values: list[Any], what: str, files: list[Path], rtol: float = 1e-4) -> None:
    first = values[0]
    for v, f in zip(values, files):
        if first is None and v is None:
            continue
        bad = (first is None) != (v is None) or (
            np.shape(v) != np.shape(first) or not np.allclose(v, first, rtol=rtol, atol=1e-4))
        if bad:
            raise MixedSeriesError(
                f"{f.name} and {files[0].name} belong to one series but differ in {what} "
                f"({v} vs {first}): they do not form one volume. Open them as separate series "
                "(move the files into separate folders)."
            )


def _series_label(ds: Any) -> str:
    return str(ds.get("SeriesDescription", "") or ds.get("SeriesInstanceUID", ""))


def _single_frame_volume(items: list[tuple[Path, Any]]) -> DicomVolume:
    """A volume from single-frame files of one series."""
    files = [p for p, _ in items]
    sets = [ds for _, ds in items]
    sizes = [(int(ds.Rows), int(ds.Columns)) for ds in sets]
    _same(sizes, "rows × columns", files)
    orients = [_floats(ds.get("ImageOrientationPatient"), 6) for ds in sets]
    _same(orients, "ImageOrientationPatient", files)
    spacings = [_floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2) for ds in sets]
    _same(spacings, "PixelSpacing", files)
    positions = [_floats(ds.get("ImagePositionPatient"), 3) for ds in sets]
    orientation = orients[0] or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    row, col, normal = _unit_normal(orientation)
    pixel = spacings[0] or (1.0, 1.0)
    if len(items) > 1 and any(p is None for p in positions):
        missing = files[[p is None for p in positions].index(True)].name
        raise MixedSeriesError(
            f"{missing} has no ImagePositionPatient, so the slices of its series cannot be "
            "ordered. Open the files one by one instead."
        )
    if len(items) > 1:
        pos = np.asarray(positions, dtype=np.float64)
        depth = pos @ normal
        order = np.argsort(depth, kind="stable")
        depth = depth[order]
        steps = np.diff(depth)
        dup = np.nonzero(np.abs(steps) < 1e-3)[0]
        if dup.size:
            a, b = files[order[dup[0]]].name, files[order[dup[0] + 1]].name
            raise MixedSeriesError(
                f"{a} and {b} lie at the same position ({depth[dup[0]]:.3f} mm along the slice "
                "normal): the series holds several stacks (echoes, phases or repeats). Split "
                "them into separate folders and open each."
            )
        dz = float(np.median(steps))
        if np.max(np.abs(steps - dz)) > SPACING_RTOL * dz + 1e-3:
            raise IrregularSpacingError(
                f"the slices of series '{_series_label(sets[0])}' are not evenly spaced "
                f"(steps from {steps.min():.3f} to {steps.max():.3f} mm along the normal): "
                "slices are missing or several stacks are mixed. Open a complete series."
            )
        step_vec = (pos[order[-1]] - pos[order[0]]) / (len(order) - 1)
        origin = pos[order[0]]
    else:
        order = np.array([0])
        dz = float(sets[0].get("SpacingBetweenSlices") or sets[0].get("SliceThickness") or 1.0)
        step_vec = normal * dz
        origin = np.asarray(positions[0] or (0.0, 0.0, 0.0), dtype=np.float64)
    slices = []
    syntaxes = []
    for i in order:
        path, ds = items[i]
        _check_image(path, ds)
        stored = _decode(path, ds)
        if stored.ndim != 2:
            raise MixedSeriesError(
                f"{path.name} holds {stored.shape} pixels, not one 2D slice, inside a series of "
                "single slices. Open it on its own."
            )
        slices.append(_rescale(path, ds, stored))
        syntaxes.append(str(getattr(ds.file_meta, "TransferSyntaxUID", "")))
    array = np.stack(slices, 0)
    affine = np.eye(4)
    affine[:3, 0] = step_vec
    affine[:3, 1] = col * pixel[0]
    affine[:3, 2] = row * pixel[1]
    affine[:3, 3] = origin
    return _volume(array, (abs(dz), pixel[0], pixel[1]), affine, orientation, sets[0],
                   [str(files[i]) for i in order],
                   [str(sets[i].get("SOPInstanceUID", "")) for i in order], False,
                   sorted(set(syntaxes)))


def _volume(array: np.ndarray, spacing: Sequence[float], affine: np.ndarray,
            orientation: Sequence[float], ds: Any, files: list[str], sops: list[str],
            multiframe: bool, syntaxes: list[str]) -> DicomVolume:
    number = ds.get("SeriesNumber")
    return DicomVolume(
        array=np.ascontiguousarray(array, dtype=np.float32),
        spacing=tuple(float(s) for s in spacing),
        affine=affine,
        orientation=tuple(float(v) for v in orientation),
        units=_units(ds),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "") or ""),
        series_number=None if number in (None, "") else int(number),
        files=files,
        sop_instance_uids=sops,
        multiframe=multiframe,
        transfer_syntaxes=syntaxes,
    )


def _multiframe_volume(path: Path, ds: Any) -> DicomVolume:
    """A volume from one multi-frame file (enhanced, with per-frame positions, or legacy)."""
    _check_image(path, ds)
    if "PerFrameFunctionalGroupsSequence" in ds:
        import highdicom as hd

        stored = _decode(path, ds)  # named errors for compression and truncation first
        del stored
        try:
            vol = hd.Image.from_dataset(ds, copy=False).get_volume(dtype=np.float32)
        except (ValueError, RuntimeError, AttributeError, KeyError) as e:
            raise MixedSeriesError(
                f"the frames of {path.name} do not form one regularly spaced volume ({e}). "
                "Open a file whose frames are one stack."
            ) from None
        array = np.asarray(vol.array, dtype=np.float32)
        affine = np.asarray(vol.affine, dtype=np.float64)
        direction = np.asarray(vol.direction, dtype=np.float64)
        orientation = (*direction[:, 2], *direction[:, 1])
        _, _, normal = _unit_normal(orientation)
        if array.shape[0] > 1 and float(affine[:3, 0] @ normal) < 0:
            # ascending along the normal, as single-frame series are sorted
            array = array[::-1]
            affine = affine.copy()
            affine[:3, 3] = affine[:3, 3] + affine[:3, 0] * (array.shape[0] - 1)
            affine[:3, 0] = -affine[:3, 0]
        spacing = tuple(float(s) for s in vol.spacing)
        return _volume(array, spacing, affine, orientation, ds, [str(path)],
                       [str(ds.get("SOPInstanceUID", ""))], True,
                       [str(ds.file_meta.TransferSyntaxUID)])
    stored = _decode(path, ds)
    frames = stored if stored.ndim == 3 else stored[None]
    array = _rescale(path, ds, frames)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6) or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    row, col, normal = _unit_normal(orientation)
    pixel = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2) or (1.0, 1.0)
    offsets = _floats(ds.get("GridFrameOffsetVector"), array.shape[0])
    if offsets is not None and len(offsets) > 1:
        dz = float(np.median(np.diff(offsets)))
    else:
        dz = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = normal * dz
    affine[:3, 1] = col * pixel[0]
    affine[:3, 2] = row * pixel[1]
    affine[:3, 3] = _floats(ds.get("ImagePositionPatient"), 3) or (0.0, 0.0, 0.0)
    return _volume(array, (abs(dz) or 1.0, pixel[0], pixel[1]), affine, orientation, ds,
                   [str(path)], [str(ds.get("SOPInstanceUID", ""))], True,
                   [str(ds.file_meta.TransferSyntaxUID)])


def read_dicom_volumes(paths: str | Path | Sequence[str | Path]) -> list[DicomVolume]:
    """Every series in ``paths`` (files and/or folders) as a :class:`DicomVolume`.

    One volume per ``SeriesInstanceUID`` (and per multi-frame file), in the order of the
    series numbers. Non-image objects inside folders (reports, RT plans, SEGs) are skipped
    and listed in each volume's ``skipped``; given as files, they raise. Raises a
    :class:`DicomReadError` subclass, naming the file, for the first problem found; then
    nothing is returned.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    explicit = {Path(p) for p in paths if Path(p).is_file()}
    files, _ = _expand(paths)
    singles: dict[str, list[tuple[Path, Any]]] = {}
    volumes: list[DicomVolume] = []
    skipped: list[NotAnImageError] = []
    for f in files:
        ds = _read_dataset(f)
        try:
            _check_image(f, ds)
        except NotAnImageError as e:
            if f in explicit:
                raise
            skipped.append(e)  # reports, plans, SEGs beside the images of a study folder
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            volumes.append(_multiframe_volume(f, ds))
        else:
            key = str(ds.get("SeriesInstanceUID", "")) or f"file:{f}"
            singles.setdefault(key, []).append((f, ds))
    for items in singles.values():
        volumes.append(_single_frame_volume(items))
    if not volumes and skipped:
        raise NotAnImageError(f"{len(skipped)} DICOM object(s) and no image series: "
                              f"{skipped[0]}")
    for vol in volumes:
        vol.skipped = [str(e).split(" is ")[0] for e in skipped]
    volumes.sort(key=lambda v: (v.series_number is None, v.series_number or 0, v.name))
    return volumes


def read_dicom_volume(path: str | Path | Sequence[str | Path]) -> DicomVolume:
    """The one series in ``path``; a :class:`DicomReadError` when there are several."""
    volumes = read_dicom_volumes(path)
    if len(volumes) > 1:
        names = "; ".join(f"'{v.name}' ({len(v.files)} file(s))" for v in volumes)
        raise MixedSeriesError(
            f"{path} holds {len(volumes)} series: {names}. Give the folder or files of one "
            "series."
        )
    return volumes[0]


# --------------------------------------------------------------------------- npe2 reader
LayerData = tuple[Any, dict[str, Any], str]


def _is_candidate(path: str) -> bool:
    p = Path(path)
    if p.is_dir():
        return any(is_dicom_file(f) for f in _first_files(p))
    return p.name.lower().endswith(DICOM_SUFFIXES) or is_dicom_file(p)


def _first_files(root: Path, limit: int = 64, depth: int = 3) -> Iterable[Path]:
    """Up to ``limit`` files under ``root``, at most ``depth`` folders down, breadth first:
    enough to tell a DICOM folder quickly, however large the tree."""
    import os

    queue = [(root, 0)]
    seen = 0
    while queue and seen < limit:
        folder, level = queue.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                seen += 1
                yield Path(entry.path)
                if seen >= limit:
                    return
            elif entry.is_dir() and level + 1 < depth:
                queue.append((Path(entry.path), level + 1))


def get_reader(path: str | list[str]) -> Any:
    """npe2 reader contribution: :func:`read_dicom_layers` for DICOM files or folders."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_is_candidate(str(p)) for p in paths):
        return None
    return read_dicom_layers


def read_dicom_layers(path: str | list[str]) -> list[LayerData]:
    """One image layer per series: ``scale`` from the spacing, geometry in the metadata."""
    volumes = read_dicom_volumes(path if isinstance(path, (str, Path)) else list(path))
    out: list[LayerData] = []
    seen: dict[str, int] = {}
    for vol in volumes:
        name = vol.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} ({seen[name]})"
        data = vol.array
        scale: tuple[float, ...] = vol.spacing
        if data.shape[0] == 1:  # a single slice opens as a 2D image
            data, scale = data[0], vol.spacing[1:]
        kwargs: dict[str, Any] = {"name": name, "scale": scale,
                                  "metadata": {META_KEY: vol.metadata()}}
        out.append((data, kwargs, "image"))
    return out
