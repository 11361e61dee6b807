"""DICOM input: built here with pydicom from real sample X-rays, in the encodings scanners write."""


import numpy as np
import pytest
import torch
from PIL import Image

from cxr_core.preprocessing import InvalidImageError, PreprocessConfig, load_image, preprocess
from handlers.cxr_handler import XrayHandler
from loadtest.hostile import dicom_file
from tests.handler_support import FakeContext, assert_same_answer, encode, write_tiny_checkpoint

CONFIG = PreprocessConfig(image_size=128)


@pytest.fixture(scope="module")
def gray(sample_paths) -> np.ndarray:
    return np.asarray(load_image(sample_paths[-1]).resize((400, 330)))


def reference(gray: np.ndarray) -> torch.Tensor:
    return preprocess(Image.fromarray(gray, mode="L"), CONFIG)


def test_eight_bit_monochrome2_matches_the_pixels(gray):
    assert torch.equal(preprocess(dicom_file(gray), CONFIG), reference(gray))


def test_twelve_bit_monochrome1_rescale_and_window(gray):
    tolerance = 1.01 / 255 / CONFIG.std[0]
    twelve = gray.astype(np.uint16) * 16
    variants = {
        "12-bit": dicom_file(twelve + 8, bits=12),
        "MONOCHROME1": dicom_file(255 - gray, photometric="MONOCHROME1"),
        "rescale + window": dicom_file(twelve, bits=12, RescaleSlope=1, RescaleIntercept=-1024,
                                       WindowCenter=(255 * 16) / 2 - 1024, WindowWidth=255 * 16),
        "RLE compressed": dicom_file(gray, compress=True),
    }
    for name, data in variants.items():
        assert torch.allclose(preprocess(data, CONFIG), reference(gray), atol=tolerance), name


def test_dicom_without_pixel_data_is_refused(gray):
    with pytest.raises(InvalidImageError, match="no pixel data"):
        load_image(dicom_file(gray, pixel_data=False))
    broken = dicom_file(gray)
    with pytest.raises(InvalidImageError):
        load_image(broken[: len(broken) // 2])


def test_handler_answers_dicom_like_the_same_pixels(tmp_path, gray):
    write_tiny_checkpoint(tmp_path / "model.pt", image_size=128)
    handler = XrayHandler()
    handler.initialize(FakeContext(tmp_path, "model.pt"))
    context = FakeContext(tmp_path, "model.pt")
    png = encode(Image.fromarray(gray, mode="L"), "PNG")
    answers = handler.handle([{"body": dicom_file(gray)}, {"body": png}, {"body": dicom_file(gray, pixel_data=False)}],
                             context)
    assert_same_answer(answers[0], answers[1])
    assert context.statuses[2][0] == 400 and "no pixel data" in context.statuses[2][1]
