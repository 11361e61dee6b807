"""DICOM input: built here with pydicom from real sample X-rays, in the encodings scanners write."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from cxr.preprocessing import InvalidImageError, PreprocessConfig, load_image, preprocess
from handlers.cxr_handler import XrayHandler
from tests.handler_support import FakeContext, assert_same_answer, encode, write_tiny_checkpoint

CONFIG = PreprocessConfig(image_size=128)


def make_dicom(stored: np.ndarray, bits: int = 8, photometric: str = "MONOCHROME2", pixel_data: bool = True,
               compress: bool = False, **attributes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # computed radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.BodyPartExamined = "CR", "CHEST"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated = 8 if bits <= 8 else 16
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits - 1, 0
    for name, value in attributes.items():
        setattr(dataset, name, value)
    if pixel_data:
        dataset.PixelData = stored.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
        if compress:
            dataset.compress(RLELossless)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gray(sample_paths) -> np.ndarray:
    return np.asarray(load_image(sample_paths[-1]).resize((400, 330)))


def reference(gray: np.ndarray) -> torch.Tensor:
    return preprocess(Image.fromarray(gray, mode="L"), CONFIG)


def test_eight_bit_monochrome2_matches_the_pixels(gray):
    assert torch.equal(preprocess(make_dicom(gray), CONFIG), reference(gray))


def test_twelve_bit_monochrome1_rescale_and_window(gray):
    tolerance = 1.01 / 255 / CONFIG.std[0]
    twelve = gray.astype(np.uint16) * 16
    variants = {
        "12-bit": make_dicom(twelve + 8, bits=12),
        "MONOCHROME1": make_dicom(255 - gray, photometric="MONOCHROME1"),
        "rescale + window": make_dicom(twelve, bits=12, RescaleSlope=1, RescaleIntercept=-1024,
                                       WindowCenter=(255 * 16) / 2 - 1024, WindowWidth=255 * 16),
        "RLE compressed": make_dicom(gray, compress=True),
    }
    for name, data in variants.items():
        assert torch.allclose(preprocess(data, CONFIG), reference(gray), atol=tolerance), name


def test_dicom_without_pixel_data_is_refused(gray):
    with pytest.raises(InvalidImageError, match="no pixel data"):
        load_image(make_dicom(gray, pixel_data=False))
    broken = make_dicom(gray)
    with pytest.raises(InvalidImageError):
        load_image(broken[: len(broken) // 2])


def test_handler_answers_dicom_like_the_same_pixels(tmp_path, gray):
    write_tiny_checkpoint(tmp_path / "model.pt", image_size=128)
    handler = XrayHandler()
    handler.initialize(FakeContext(tmp_path, "model.pt"))
    context = FakeContext(tmp_path, "model.pt")
    png = encode(Image.fromarray(gray, mode="L"), "PNG")
    answers = handler.handle([{"body": make_dicom(gray)}, {"body": png}, {"body": make_dicom(gray, pixel_data=False)}],
                             context)
    assert_same_answer(answers[0], answers[1])
    assert context.statuses[2][0] == 400 and "no pixel data" in context.statuses[2][1]
