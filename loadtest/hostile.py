"""Hostile inputs, built on the fly (small on disk, never committed): bodies within the 16 MiB limit that try to
make a worker decode too much, for too long. Used by tests/test_hostile.py and the drills' hostile storm.

Every case must get its own 4xx within seconds, leave the X-rays batched with it answered and the worker alive,
with its peak memory growing by at most 300 MB.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

Case = tuple[bytes, str]  # (body, Content-Type)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def dicom_file(pixels: np.ndarray, bits: int | None = None, photometric: str = "MONOCHROME2", syntax: str = "",
               frames: int = 1, pixel_data: bool = True, compress: bool = False, **attributes: object) -> bytes:
    """A chest DICOM file around `pixels` (one frame, repeated `frames` times): `bits` stored (default: the
    dtype's) in 8 or 16 allocated, the transfer syntax `syntax` (default explicit VR little endian) or RLE when
    `compress`, any other `attributes` set as they are. The hostile cases below and tests/test_dicom.py use it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    bits = bits or pixels.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # computed radiography
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), syntax or ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.BodyPartExamined = "CR", "CHEST"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated = 8 if bits <= 8 else 16
    dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits - 1, 0
    for name, value in attributes.items():
        setattr(dataset, name, value)
    if frames > 1:
        dataset.NumberOfFrames = frames
    if pixel_data:
        dataset.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes() * frames
        if compress:
            dataset.compress(RLELossless)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _rle8_bmp(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP: each row runs of 255 pixels, which Pillow decodes in Python, pixel run by pixel run."""
    row = b"".join(bytes([min(255, width - x), x % 200]) for x in range(0, width, 255)) + b"\x00\x00"
    pixels = row * height + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    header_size = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", header_size + len(pixels), 0, 0, header_size) + info + palette + pixels


def _json_images(images: list[bytes]) -> bytes:
    return json.dumps({"instances": [base64.b64encode(image).decode() for image in images]}).encode()


def deflated_dicom_bomb() -> Case:
    """72 MB of 16-bit pixels deflated into a ~70 KB file (pydicom inflates all of it on read)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return dicom_file(np.zeros((6000, 6000), np.uint16), syntax=DeflatedExplicitVRLittleEndian), "application/dicom"


def multiframe_dicom() -> Case:
    """20 frames of 512x512: an X-ray has one."""
    return dicom_file(np.full((512, 512), 90, np.uint8), frames=20), "application/dicom"


def sixteen_bit_png() -> Case:
    """36 Mpx of 16-bit grey (the per-image pixel limit) in a small PNG: decoded, never widened."""
    return _png(Image.fromarray(np.zeros((6000, 6000), np.uint16))), "image/png"


def float_tiff() -> Case:
    """32-bit float grey, 24 Mpx: over the decoded-bytes limit, refused before decoding."""
    image = Image.fromarray(np.zeros((4000, 6000), np.float32), mode="F")
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue(), "image/tiff"


def rle_bmp_storm() -> Case:
    """16 RLE-compressed BMPs of 2000x2000 (about 30 KB each) in one JSON request."""
    return _json_images([_rle8_bmp(2000, 2000)] * 16), "application/json"


def pixel_budget_storm() -> Case:
    """16 PNGs of 30 Mpx each in one request: each under the per-image limit, together far over the request's."""
    return _json_images([_png(Image.new("L", (6000, 5000), 128))] * 16), "application/json"


def one_bit_bomb() -> Case:
    """A 1-bit PNG of 12000x12000 (144 Mpx) in ~20 KB."""
    return _png(Image.new("1", (12_000, 12_000))), "image/png"


CASES: dict[str, Callable[[], Case]] = {
    "deflated DICOM bomb": deflated_dicom_bomb,
    "multi-frame DICOM": multiframe_dicom,
    "16-bit PNG at the pixel limit": sixteen_bit_png,
    "float32 TIFF": float_tiff,
    "16 RLE BMPs in one request": rle_bmp_storm,
    "16 x 30 Mpx PNGs in one request": pixel_budget_storm,
    "1-bit PNG bomb": one_bit_bomb,
}


def peak_growth_mb(pids: list[int | str], baselines: dict[int | str, int]) -> int:
    """The largest VmHWM growth (MB) of `pids` since `baselines` (their RSS when their peaks were reset)."""
    def status(pid: int | str, key: str) -> int:
        line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1]) // 1024

    return max((status(pid, "VmHWM") - baselines[pid] for pid in pids if pid in baselines), default=0)


def reset_peaks(pids: list[int | str]) -> dict[int | str, int]:
    """Reset each worker's VmHWM (Linux clear_refs "5") and return its RSS in MB."""
    baselines = {}
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS"))
            baselines[pid] = int(line.split()[1]) // 1024
        except OSError:  # another user's process, or no such process any more
            pass
    return baselines


def corpus() -> dict[str, Case]:
    """Every case, built."""
    return {name: build() for name, build in CASES.items()}
