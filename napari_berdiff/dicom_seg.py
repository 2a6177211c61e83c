"""Accepted masks and frequency maps as DICOM Segmentation objects (highdicom); npe2 writers.

Engine module: numpy, pydicom and highdicom, imported when used. No Qt, no napari.

A layer over a DICOM series (``metadata["dicom"]``, see :mod:`napari_berdiff.geometry`) is
written as a SEG that references that series:

- a Labels layer as a BINARY SEG, one segment per label value; a FRACTIONAL (probability)
  SEG for a frequency or probability map;
- the mask's voxels are placed in a highdicom ``Volume`` of the whole series (a region or a
  single slice padded with zeros), so each SEG frame has its source frame's geometry and
  references it; empty frames are left out;
- the segment's algorithm is the model (name, family "Artificial Intelligence", the
  checkpoint's sha256 in the version) with algorithm type AUTOMATIC, or SEMIAUTOMATIC when
  the mask was edited after it was accepted (MANUAL for a mask with no accept record).

Where the provenance goes, and why: the whole record (:mod:`napari_berdiff.provenance`), as
JSON, goes into the segment's **Algorithm Parameters** (0066,0032; LT, up to 10240
characters) inside its Segmentation Algorithm Identification Sequence. That is the standard
attribute for "the parameters of the algorithm that made this segment", it travels with the
segment it describes, it survives anonymisers that strip private tags, and it is long
enough (Content Description and Series Description are LO, 64 characters). A one-line
summary goes into Content Description, and the model's name into the Series Description.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .provenance import PROVENANCE_KEY, edited_after_accept, provenance_document

__all__ = ["write_seg", "write_labels_seg", "write_fractional_seg", "read_provenance",
           "SegWriteError"]

#: the longest Algorithm Parameters value the standard allows (LT)
MAX_PARAMETERS = 10240
PARAMETERS_PREFIX = "napari-berdiff-provenance="


class SegWriteError(ValueError):
    """A layer that cannot be written as DICOM SEG; the message says what to do."""


def _seg_path(path: str) -> str:
    return path if path.lower().endswith((".dcm", ".dicom")) else path + ".dcm"


def _dicom_meta(attributes: dict[str, Any], path: str) -> dict[str, Any]:
    meta = (attributes.get("metadata") or {}).get("dicom")
    if not isinstance(meta, dict) or not meta.get("files"):
        name = attributes.get("name") or "this layer"
        raise SegWriteError(
            f"'{name}' is not over a DICOM series, so {Path(path).name} could not reference "
            "one. Save it as NIfTI (.nii.gz), or sample on an image opened from DICOM."
        )
    if int(meta.get("leading", 0) or 0):
        raise SegWriteError(
            f"'{attributes.get('name', 'the layer')}' holds several samples. Accept one (or "
            "the consensus) into a Labels layer and save that as DICOM SEG."
        )
    return meta


def _source_datasets(meta: dict[str, Any]) -> list[Any]:
    import pydicom

    files = [Path(f) for f in meta["files"]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SegWriteError(
            f"the source series' file {missing[0]} is gone ({len(missing)} of {len(files)} "
            "missing). A SEG must reference its source images: put the series back where it "
            "was opened from, or save as NIfTI instead."
        )
    sets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    want = list(meta.get("sop_instance_uids") or [])
    have = [str(ds.SOPInstanceUID) for ds in sets]
    if want and want != have:
        raise SegWriteError(
            "the files of the source series changed since it was opened (their SOP Instance "
            "UIDs differ). Open the series again, accept again, then save."
        )
    return sets


def _volume(meta: dict[str, Any], array: np.ndarray) -> Any:
    """A highdicom Volume of the whole series holding ``array`` where the layer sits.

    A region or a slice is put into an empty volume of the series' shape, so every SEG
    frame has its source frame's geometry (empty frames are left out of the SEG).
    """
    import highdicom as hd

    from .geometry import _dicom_region

    start, shape = _dicom_region(meta)
    full_shape = [int(s) for s in meta.get("shape") or shape]
    arr = np.asarray(array)
    if arr.shape != tuple(shape):
        if arr.size != int(np.prod(shape)):
            raise SegWriteError(
                f"the layer's shape {arr.shape} does not match the region it records in the "
                f"series ({tuple(shape)}); it cannot be placed. Save it as NIfTI instead."
            )
        arr = arr.reshape(shape)
    full = np.zeros(full_shape, dtype=arr.dtype)
    full[tuple(slice(a, a + n) for a, n in zip(start, shape))] = arr
    return hd.Volume(full, np.asarray(meta["affine"], dtype=np.float64),
                     coordinate_system="PATIENT",
                     frame_of_reference_uid=meta.get("frame_of_reference_uid") or None)


def _algorithm(record: dict[str, Any] | None, doc: dict[str, Any] | None) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    model = (record or {}).get("model") or {}
    sha = model.get("sha256") or "unknown"
    alg = hd.AlgorithmIdentificationSequence(
        name=(model.get("name") or "napari-berdiff")[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=f"{__version__} sha256:{sha[:16]}"[:64],
        source="napari-berdiff",
    )
    if doc is not None:
        accepts = list(doc["accepts"])
        text = PARAMETERS_PREFIX + json.dumps({**doc, "accepts": accepts}, separators=(",", ":"))
        while len(text) > MAX_PARAMETERS and len(accepts) > 1:  # keep the latest accepts
            accepts = accepts[1:]
            text = PARAMETERS_PREFIX + json.dumps(
                {**doc, "accepts": accepts, "earlier_accepts_omitted": True},
                separators=(",", ":"))
        alg[0].AlgorithmParameters = text
    return alg


def _summary(record: dict[str, Any] | None, edited: bool | None) -> str:
    if not record:
        return "napari-berdiff mask"
    choice = record.get("choice") or {}
    what = (f"sample {choice['sample']}" if "sample" in choice
            else f"{choice.get('consensus', 'consensus')} >= {choice.get('threshold', '')}")
    text = (f"{record['model'].get('name', '')} {what} seed {record.get('seed')} "
            f"{record.get('steps')} steps" + (" edited" if edited else ""))
    return text.encode("ascii", "replace").decode()[:64]  # LO, default character set


def write_seg(path: str, data: Any, attributes: dict[str, Any], fractional: bool) -> list[str]:
    """Write a Labels layer (binary) or a map (fractional) as DICOM SEG; returns the path."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from . import __version__

    path = _seg_path(str(path))
    meta = _dicom_meta(attributes, path)
    metadata = attributes.get("metadata") or {}
    arr = np.asarray(data)
    doc = provenance_document(metadata, arr)
    records = (metadata.get(PROVENANCE_KEY) or {}).get("accepts") or []
    record = records[-1] if records else None
    edited = edited_after_accept(metadata, arr)
    if fractional:
        values = np.asarray(arr, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise SegWriteError(
                f"'{attributes.get('name', 'the map')}' holds values outside [0, 1]; only "
                "frequency and probability maps can be written as a fractional SEG."
            )
        pixel = values
        labels = [1]
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
        algo_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    else:
        if arr.dtype.kind not in "biu":
            raise SegWriteError(f"'{attributes.get('name', 'the layer')}' holds {arr.dtype} "
                                "values; a Labels layer of integers is needed.")
        labels = [int(v) for v in np.unique(arr) if v > 0]
        if not labels:
            raise SegWriteError(
                f"'{attributes.get('name', 'the layer')}' is empty: accept a sample first, "
                "then save."
            )
        pixel = np.zeros(arr.shape, dtype=np.uint16 if len(labels) > 255 else np.uint8)
        for number, value in enumerate(labels, start=1):
            pixel[arr == value] = number
        seg_type = hd.seg.SegmentationTypeValues.BINARY
        if record is None:
            algo_type = hd.seg.SegmentAlgorithmTypeValues.MANUAL
        elif edited:
            algo_type = hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
        else:
            algo_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    model_name = ((record or {}).get("model") or {}).get("name") or "napari-berdiff"
    algorithm = None if algo_type == hd.seg.SegmentAlgorithmTypeValues.MANUAL \
        else _algorithm(record, doc)
    descriptions = []
    for number, value in enumerate(labels, start=1):
        label = (f"{model_name} sample frequency" if fractional
                 else f"{model_name} label {value}")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=algo_type,
            algorithm_identification=algorithm,
        ))
    sources = _source_datasets(meta)
    kwargs: dict[str, Any] = {}
    if fractional:
        kwargs = {"fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
                  "max_fractional_value": 255}
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=_volume(meta, pixel),
        segmentation_type=seg_type,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="napari-berdiff",
        manufacturer_model_name=model_name[:64],
        software_versions=f"napari-berdiff {__version__}",
        device_serial_number="none",
        content_description=_summary(record, edited),
        series_description=f"BerDiff {model_name}"[:64],
        content_label="BERDIFF",
        **kwargs,
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return [path]


def write_labels_seg(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: a Labels layer over a DICOM series as a binary DICOM SEG."""
    return write_seg(path, data, attributes, fractional=False)


def write_fractional_seg(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer: a frequency or probability map as a FRACTIONAL (probability) DICOM SEG."""
    return write_seg(path, data, attributes, fractional=True)


def read_provenance(seg: Any, segment_number: int = 1) -> dict[str, Any] | None:
    """The provenance document stored in a SEG's segment (a path or a dataset), or None."""
    import pydicom

    ds = pydicom.dcmread(str(seg)) if isinstance(seg, (str, Path)) else seg
    item = next((s for s in ds.SegmentSequence
                 if int(s.SegmentNumber) == int(segment_number)), None)
    algs = getattr(item, "SegmentationAlgorithmIdentificationSequence", None) or []
    for alg in algs:
        text = str(getattr(alg, "AlgorithmParameters", "") or "")
        if text.startswith(PARAMETERS_PREFIX):
            return json.loads(text[len(PARAMETERS_PREFIX):])
    return None
