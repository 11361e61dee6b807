"""The one definition of preprocessing, used by training, export checks and the serving handler.

Every input becomes an 8-bit grayscale image first (`load_image`), whatever it was: 8- or 16-bit grayscale,
RGB, RGBA, palette, CMYK, with or without an EXIF orientation. The whole image is then resized to a square
without cropping: most of the Kermany training images reached us already squashed to 224x224 while the test
images keep their aspect ratio, and squashing both treats them alike (a centre crop would not).
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

# Refuse decompression bombs ourselves with a clear message instead of PIL's warning/exception mix. 36 Mpx is
# 6000x6000, above any chest detector (about 4300x4300); decoding never widens pixels beyond uint16/float32, so
# one image costs a worker at most ~4 bytes per pixel on top of the decoder's own buffer.
MAX_IMAGE_PIXELS = 36_000_000
# And at most this many bytes of decoded pixels (Pillow's buffer, or DICOM's float32 working copy): 36 Mpx of
# 16-bit grey, 20 Mpx of 32-bit grey or RGBA, 26 Mpx of RGB. Every step after decoding works at the same width
# or narrower, so one image costs a worker about 2-3x this at peak.
MAX_DECODED_BYTES = 80_000_000
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2,
                    "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}  # anything else: 4
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# Codecs refused before any pixel is decoded: Pillow decodes RLE BMPs in Python (16 small ones kept a worker busy
# past its 60 s response timeout); the deflated DICOM transfer syntax inflates the whole file before any size
# check can run (a 1 MB file grew a worker by 2 GB).
REFUSED_PILLOW_CODECS = {"bmp_rle": "RLE-compressed BMP"}
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"


class InvalidImageError(ValueError):
    """The input cannot be turned into an X-ray tensor; the message names the problem and `kind` classifies
    it (empty, not_an_image, truncated, too_large, unreadable) so callers need not parse the message."""

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn an image into the model's input; stored in every checkpoint and archive."""

    image_size: int = 224
    channels: int = 1
    mean: tuple[float, ...] = (0.484,)
    std: tuple[float, ...] = (0.234,)
    resize: str = "squash"
    interpolation: str = "bilinear"
    # Squash the film to detail x detail pixels before the resize to image_size (None: straight to image_size):
    # a model that sees coarse detail on a fine grid (its Grad-CAM map keeps image_size's cells) learns less of
    # the source's fine texture (scanner, processing, compression).
    detail: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessConfig:
        values = dict(values)
        values.pop("extra", None)  # an always-empty field that some shipped checkpoints carry
        values["mean"] = tuple(values["mean"])
        values["std"] = tuple(values["std"])
        return cls(**values)


def load_image(source: bytes | bytearray | str | os.PathLike | Image.Image, min_size: int | None = None) -> Image.Image:
    """Decode `source` (bytes, a path or a PIL image) into an upright 8-bit grayscale ("L") image.

    `min_size`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode: DCT scaling, far cheaper
    than decoding every pixel of a 2,000 px film) as long as both sides stay >= min_size. The presets ask for
    twice the model input, so the antialiased resize that follows still averages >= 2x2 pixels.

    Raises InvalidImageError naming the problem: empty input, not an image, truncated data, absurd size.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise InvalidImageError("empty input: no image bytes were sent", "empty")
            if is_dicom(source):
                return load_dicom(bytes(source))
            stream: Any = io.BytesIO(source)
        else:
            stream = source
        try:
            image = Image.open(stream)
        except Image.DecompressionBombError as error:  # Pillow's own limit, where a server has not lifted it
            raise InvalidImageError(f"image too large: {error}", "too_large") from error
        except UnidentifiedImageError as error:
            raise InvalidImageError("not an image: the bytes are not in a format Pillow can decode",
                                    "not_an_image") from error
        except OSError as error:
            raise InvalidImageError(f"unreadable image: {error}") from error
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    codec = image.tile[0][0] if getattr(image, "tile", None) else None
    if codec in REFUSED_PILLOW_CODECS:
        raise InvalidImageError(f"{REFUSED_PILLOW_CODECS[codec]} is not accepted: send PNG or JPEG",
                                "unsupported_type")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImageError(
            f"image too large: {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels", "too_large"
        )
    if min_size and image.format == "JPEG":
        image.draft(None, (min_size, min_size))
    decoded = image.width * image.height * _BYTES_PER_PIXEL.get(image.mode, 4)
    if decoded > MAX_DECODED_BYTES:
        raise InvalidImageError(f"image too large: {width}x{height} pixels of mode {image.mode} would decode to "
                                f"{decoded} bytes, over the limit of {MAX_DECODED_BYTES}", "too_large")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(f"truncated or corrupt image data: {error}", "truncated") from error
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not refuse a decodable image
        pass
    return to_grayscale(image)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def dicom_transfer_syntax(data: bytes) -> str | None:
    """The Transfer Syntax UID (0002,0010) read off the file meta group (explicit VR little endian, right after
    "DICM") without pydicom, so a syntax can be refused before pydicom inflates or decodes anything."""
    position = 132
    while position + 8 <= len(data):
        group, element = int.from_bytes(data[position:position + 2], "little"), \
            int.from_bytes(data[position + 2:position + 4], "little")
        if group != 0x0002:
            return None
        vr = data[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, start = int.from_bytes(data[position + 8:position + 12], "little"), position + 12
        else:
            length, start = int.from_bytes(data[position + 6:position + 8], "little"), position + 8
        if element == 0x0010:
            return data[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        position = start + length
    return None


def load_dicom(data: bytes) -> Image.Image:
    """A DICOM X-ray as 8-bit grayscale: modality LUT (rescale slope/intercept), then the VOI window (or the
    full stored range when there is none), then MONOCHROME1 inverted so that bone is bright as in JPEGs.
    One frame only, sizes checked before the pixels are decoded, float32 at most."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:
        raise InvalidImageError("DICOM input needs pydicom (pip install pydicom)") from error
    if dicom_transfer_syntax(data) == DEFLATED_DICOM:
        raise InvalidImageError("deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99) is not accepted: send it "
                                "uncompressed or with an image codec (RLE, JPEG)", "unsupported_type")
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for broken files
        raise InvalidImageError(f"unreadable DICOM file: {error}") from error
    if "PixelData" not in dataset:
        raise InvalidImageError("DICOM file has no pixel data: not an image", "not_an_image")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InvalidImageError(f"DICOM file with {frames} frames: send a single-frame X-ray", "unsupported_type")
    if rows * columns * int(dataset.get("SamplesPerPixel", 1)) > MAX_IMAGE_PIXELS or \
            rows * columns * 4 > MAX_DECODED_BYTES:  # 4: the float32 working copy of the LUTs
        raise InvalidImageError(
            f"image too large: {columns}x{rows} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels", "too_large")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InvalidImageError(f"cannot decode DICOM pixel data (transfer syntax {syntax}): {error}") from error
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        frame = pixels[0] if pixels.ndim == 4 else pixels
        return to_grayscale(Image.fromarray(np.asarray(frame, dtype=np.uint8), mode="RGB"))
    slope, intercept = float(dataset.get("RescaleSlope", 1)), float(dataset.get("RescaleIntercept", 0))
    if "ModalityLUTSequence" in dataset:
        values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)
    else:  # rescale slope/intercept, in float32 (pydicom's helper widens to float64)
        values = pixels.astype(np.float32)
        values *= slope
        values += intercept
    del pixels
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center = float(np.atleast_1d(dataset.WindowCenter)[0])
        width = max(float(np.atleast_1d(dataset.WindowWidth)[0]), 1.0)
        low, high = center - width / 2.0, center + width / 2.0
    elif "VOILUTSequence" in dataset:
        values = np.asarray(apply_voi_lut(values, dataset), dtype=np.float32)
        low, high = float(values.min()), float(values.max())
    else:
        bits = int(dataset.get("BitsStored", 16))
        signed = int(dataset.get("PixelRepresentation", 0)) == 1
        stored = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        low, high = sorted((stored[0] * slope + intercept, stored[1] * slope + intercept))
    values -= low  # in place from here on: no second full-size array
    values *= 255.0 / max(high - low, 1e-9)
    np.clip(values, 0.0, 255.0, out=values)
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        np.subtract(255.0, values, out=values)
    return Image.fromarray(np.rint(values, out=values).astype(np.uint8), mode="L")


def to_grayscale(image: Image.Image) -> Image.Image:
    """Map any Pillow mode to 8-bit grayscale so that every encoding of one X-ray gives the same pixels."""
    mode = image.mode
    if mode == "L":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit data: keep the high byte ((v * 257) >> 8 == v), so a 16-bit copy of an 8-bit image matches it;
        # never wider than uint16 (32-bit "I" images are clipped into it).
        values = np.asarray(image)
        if values.dtype != np.uint16:
            values = np.clip(values, 0, 65535).astype(np.uint16)
        high = values.astype("<u2", copy=False).view(np.uint8)[..., 1::2]  # the high bytes, no wider array
        return Image.fromarray(np.ascontiguousarray(high), mode="L")
    if mode == "F":
        # Pillow's own float32 arithmetic (one more buffer of the same size), then its clipping conversion.
        scale = 255.0 if image.getextrema()[1] <= 255.0 else 65535.0
        return image.point(lambda value: value * (255.0 / scale) + 0.5).convert("L")
    if mode in ("LA", "La"):
        return image.getchannel(0)
    if mode == "1":
        return image.convert("L")
    # RGBA/RGBa drop their alpha, P/PA/CMYK/YCbCr/LAB/HSV go through RGB; RGB -> L is ITU-R 601 luma,
    # which leaves a grey pixel (r == g == b) unchanged.
    return image.convert("RGB").convert("L")


def _interpolation(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode(name)


class EvalPreset:
    """Deterministic preprocessing for evaluation and serving: grayscale -> square resize -> tensor -> normalise."""

    def __init__(self, config: PreprocessConfig) -> None:
        if config.resize != "squash":
            raise ValueError(f"unknown resize mode {config.resize!r}")
        if config.detail is not None and not 0 < config.detail < config.image_size:
            raise ValueError(f"detail {config.detail} must lie between 0 and the image size {config.image_size}")
        self.config = config
        self.decode_size = 2 * config.image_size  # see load_image(min_size=...)
        sides = [side for side in (config.detail, config.image_size) if side]
        self.resize = v2.Compose([v2.Resize((side, side), interpolation=_interpolation(config.interpolation),
                                            antialias=True) for side in sides])
        self.normalize = v2.Normalize(mean=list(config.mean) * _repeat(config), std=list(config.std) * _repeat(config))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_grayscale(image)
        tensor = v2.functional.pil_to_tensor(self.resize(image))
        return self.normalize(_to_channels(tensor, self.config.channels).float().div_(255.0))

    def decode(self, source: bytes | str | os.PathLike | Image.Image) -> Image.Image:
        """The upright grayscale image, decoded no larger than this preset needs (JPEG draft mode)."""
        return load_image(source, self.decode_size)

    def load(self, source: bytes | str | os.PathLike | Image.Image) -> torch.Tensor:
        """Decode and preprocess one image into the model's (channels, size, size) input."""
        return self(self.decode(source))


class TrainPreset:
    """Training preprocessing: the eval resize plus augmentations that keep an X-ray an X-ray.

    Small rotations, shifts and zooms, brightness and contrast. No vertical flip (anatomy has an up) and no
    horizontal flip (the heart is on the left, and reports say "left lower lobe").
    """

    def __init__(
        self,
        config: PreprocessConfig,
        *,
        degrees: float = 7.0,
        translate: float = 0.06,
        scale: tuple[float, float] = (0.9, 1.1),
        brightness: float = 0.2,
        contrast: float = 0.2,
    ) -> None:
        self.eval_preset = EvalPreset(config)
        self.decode_size = self.eval_preset.decode_size
        self.augment = v2.Compose(
            [
                v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale),
                v2.ColorJitter(brightness=brightness, contrast=contrast),
            ]
        )

    def load(self, source: bytes | str | os.PathLike | Image.Image) -> torch.Tensor:
        return self(self.eval_preset.decode(source))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.with_mask(image, None)[0]

    def with_mask(self, image: Image.Image, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The augmented input and a (1, size, size) mask on it moved by the same random affine transform."""
        image = to_grayscale(image)
        config = self.eval_preset.config
        tensor = v2.functional.pil_to_tensor(self.eval_preset.resize(image))
        if mask is None:
            tensor = self.augment(tensor)
        else:
            tensor, mask = self.augment(tv_tensors.Image(tensor), tv_tensors.Mask(mask))
            tensor, mask = tensor.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return self.eval_preset.normalize(_to_channels(tensor, config.channels).float().div_(255.0)), mask


def preprocess(source: bytes | str | os.PathLike | Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """Decode and preprocess one image into a (channels, size, size) float tensor."""
    return EvalPreset(config).load(source)


def _repeat(config: PreprocessConfig) -> int:
    return config.channels if len(config.mean) == 1 else 1


def _to_channels(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    return tensor if channels == 1 else tensor.expand(channels, -1, -1)
