"""Data: phantoms with several annotators, the semi-real LIDC readers' contours, the LIDC-crops
layout, image/mask folders, splits.

No Qt, no napari, no torch.
"""

from .dataset import SegDataset, SegItem
from .layout import (
    detect_layout,
    load_dataset,
    load_image_mask_folder,
    load_lidc_layout,
    write_lidc_layout,
)
from .lidc import load_lidc_readers, patient_split
from .phantoms import Phantom, make_phantom, make_phantoms, oracle_samples
from .splits import split_cases, split_dataset

__all__ = [
    "Phantom",
    "SegDataset",
    "SegItem",
    "detect_layout",
    "load_dataset",
    "load_image_mask_folder",
    "load_lidc_readers",
    "load_lidc_layout",
    "make_phantom",
    "make_phantoms",
    "oracle_samples",
    "patient_split",
    "split_cases",
    "split_dataset",
    "write_lidc_layout",
]
