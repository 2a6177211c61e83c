"""Synthetic DICOM series written with pydicom, for reader and writer tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def hu_volume(nz: int = 5, ny: int = 24, nx: int = 20, seed: int = 0) -> np.ndarray:
    """A (Z, Y, X) volume in even Hounsfield units (stored exactly with slope 2, intercept
    -1024) whose slices all differ."""
    rng = np.random.default_rng(seed)
    vol = (rng.integers(12, 712, size=(nz, ny, nx)) * 2 - 1024).astype(np.int32)
    vol[:, 0, 0] = np.arange(nz) * 100 - 900  # slice k's first pixel tells k
    return vol


def write_ct_series(folder: str | Path, hu: np.ndarray, *, spacing=(2.5, 0.7, 0.9),
                    origin=(-100.0, -120.0, 30.0), orientation=(1, 0, 0, 0, 1, 0),
                    slope: float = 2.0, intercept: float = -1024.0, shuffle: bool = True,
                    description: str = "Synthetic CT", series_uid: str | None = None,
                    study_uid: str | None = None, series_number: int = 3,
                    instance_numbers: str = "reversed", names: str = "scrambled",
                    seed: int = 0) -> list[Path]:
    """Write ``hu`` (Z, Y, X, whole HU) as single-frame CT files; returns the paths.

    Slice k sits at ``origin + k·spacing[0]·normal``. File names, the order files are
    written in and ``InstanceNumber`` all disagree with the true order, so a reader that
    sorts by any of them fails.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    assert np.array_equal(stored.astype(np.float64) * slope + intercept, hu)
    order = list(range(hu.shape[0]))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    paths = []
    for rank, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_CLASS
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_CLASS
        ds.SOPInstanceUID = sop
        ds.PatientName = "Phantom^Synthetic"
        ds.PatientID = "SYN001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyID = "1"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.Manufacturer = "tests"
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        n = hu.shape[0]
        ds.InstanceNumber = (n - k) if instance_numbers == "reversed" else k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        pos = np.asarray(origin, float) + k * spacing[0] * normal
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        name = f"IM{(rank * 7919) % 1000:04d}.dcm" if names == "scrambled" else f"{k:04d}.dcm"
        path = folder / name
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def pydicom_file(name: str) -> str:
    """A file of pydicom's own test data that ships in the wheel (never downloaded)."""
    import pytest
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return str(path)


def read(path: Any) -> Any:
    import pydicom

    return pydicom.dcmread(str(path))
