"""DICOM films for the DICOM node's tests and drills: an example X-ray in a full patient / study / series header."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from cxr.paths import EXAMPLE_XRAYS
from loadtest.hostile import dicom_file

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def fixture_pixels(index: int = 0, side: int = 256) -> np.ndarray:
    paths = sorted(EXAMPLE_XRAYS.glob("*/*.jpeg"))
    with Image.open(paths[index % len(paths)]) as image:
        return np.asarray(image.convert("L").resize((side, side)))


def study_film(pixels: np.ndarray | None = None, *, study: str = "1.2.826.0.1.3680043.10.1.1",
               series: str = "1.2.826.0.1.3680043.10.1.1.1", instance: str | None = None, view: str = "PA",
               **attributes: object) -> bytes:
    """A DX chest film of patient TEST^CXR in `study` / `series` (SOP Instance UID `instance`, new by default)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    data = dicom_file(fixture_pixels() if pixels is None else pixels, **{
        "PatientName": "TEST^CXR", "PatientID": "CXR-TEST-1", "PatientBirthDate": "19700101", "PatientSex": "O",
        "StudyInstanceUID": study, "SeriesInstanceUID": series, "StudyID": "1", "SeriesNumber": 1,
        "InstanceNumber": 1, "AccessionNumber": "A1", "StudyDate": "20261201", "StudyTime": "120000",
        "ReferringPhysicianName": "", "Manufacturer": "test", "ViewPosition": view, **attributes})
    dataset = dcmread(io.BytesIO(data))
    uid = instance or generate_uid()
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = attributes.get("SOPClassUID",
                                                                                     DX_FOR_PRESENTATION)
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = uid
    if "Modality" not in attributes:
        dataset.Modality = "DX"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_film(folder: Path, name: str, **options: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(study_film(**options))
    return path
