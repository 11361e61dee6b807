"""What a request to the handler carries, before any model runs: the images of one TorchServe request row
(raw bytes, multipart fields, JSON with base64), the refusal that names what is wrong with it, and the batch
record the handler's preprocess hands to inference and postprocess. Shipped in every archive."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr.preprocessing import MAX_IMAGE_PIXELS, InvalidImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
JSON_IMAGE_KEYS = ("image", "data", "b64", "body")
JSON_LIST_KEYS = ("instances", "images", "inputs")


class RequestError(Exception):
    """A problem with one request: its HTTP status and a message that names the problem."""

    def __init__(self, status: int, message: str, reason: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or {}  # extra fields of the error body
        # A short label for the rejection metric (a bounded set, unlike the message).
        self.reason = reason or {413: "too_large", 415: "unsupported_type", 422: "wrong_shape"}.get(
            status, "bad_request")


def decode_image(data: bytes, decode: Callable[[Image.Image | bytes], Image.Image], max_bytes: int,
                 prefix: str = "", max_pixels: int | None = None) -> tuple[Image.Image, int]:
    """The one way request bytes become an image, for the handler and the demo page alike (so a file cannot be
    previewed as one image and classified as another): the size limit, Pillow's header probe first (accepted
    formats only, and at most `max_pixels`, what is left of the request's pixel budget), then `decode` (which
    also reads DICOM and names what is not an image). Returns the image and the pixels it counted; raises
    RequestError."""
    def over_budget(width: int, height: int) -> RequestError:
        return RequestError(413, f"{prefix}{width}x{height} pixels is over what is left of the request's pixel "
                                 f"budget ({max_pixels}); send fewer or smaller images")

    if len(data) > max_bytes:
        raise RequestError(413, f"{prefix}image of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        opened = Image.open(io.BytesIO(data))  # reads the header only; decoded once, by `decode`
    except Exception:  # noqa: BLE001 - not a format Pillow knows (DICOM, junk): `decode` gives the reason
        opened = None
    if opened is not None and opened.format not in ACCEPTED_FORMATS:
        raise RequestError(415, f"{prefix}unsupported image type {opened.format}; send one of "
                                f"{', '.join(ACCEPTED_FORMATS)}")
    if opened is not None and max_pixels is not None and max_pixels < opened.width * opened.height \
            <= MAX_IMAGE_PIXELS:  # (over MAX_IMAGE_PIXELS, `decode` names the image as too large itself)
        raise over_budget(opened.width, opened.height)
    try:
        image = decode(opened if opened is not None else data)
    except InvalidImageError as error:
        reason = None if error.kind == "unreadable" else error.kind  # unreadable counts as bad_request
        status = {"too_large": 413, "unsupported_type": 415}.get(error.kind, 400)
        raise RequestError(status, f"{prefix}{error}", reason) from error
    pixels = opened.width * opened.height if opened is not None else image.width * image.height
    if max_pixels is not None and pixels > max_pixels:  # DICOM: known once decoded (its size check came first)
        raise over_budget(image.width, image.height)
    return image, pixels


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, "text body is not base64-encoded image data", "bad_base64") from error


def _images_from_json(value: Any) -> list[bytes]:
    if isinstance(value, str):
        return [_decode_base64(value)]
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)]
    if isinstance(value, list):
        if value and all(isinstance(item, (int, float)) for item in value):
            raise RequestError(400, "expected image data (bytes or base64), got a list of numbers; send the image file")
        images = []
        for index, item in enumerate(value):
            try:
                images.extend(_images_from_json(item))
            except RequestError as error:
                raise RequestError(error.status, f"image {index}: {error.message}", error.reason) from error
        return images
    if isinstance(value, dict):
        for key in JSON_LIST_KEYS:
            if key in value:
                return _images_from_json(value[key])
        for key in JSON_IMAGE_KEYS:
            if key in value:
                return _images_from_json(value[key])
        raise RequestError(400, f"JSON body has no image: expected one of the keys {JSON_IMAGE_KEYS + JSON_LIST_KEYS}")
    raise RequestError(400, f"unsupported request content of type {type(value).__name__}")


def extract_images(row: dict[str, Any]) -> list[bytes]:
    """The images of one TorchServe request row, as encoded bytes, in order."""
    if not isinstance(row, dict) or not row:
        raise RequestError(400, "empty request: no image was sent", "empty")
    values = [row["body"]] if "body" in row else ([row["data"]] if "data" in row else list(row.values()))
    images = []
    for value in values:
        if value is None:
            continue
        images.extend([bytes(value)] if isinstance(value, (bytes, bytearray)) else _images_from_json(value))
    if not images or all(len(image) == 0 for image in images):
        raise RequestError(400, "empty request: no image bytes were sent", "empty")
    return images


@dataclass
class PreparedBatch:
    """One TorchServe batch on its way through the handler.

    preprocess sets, per request, its rows of `images` (`spans`, None when refused) or the RequestError that
    refuses it (`refusals`), and whether it asked for an explanation; inference fills `probabilities`,
    `labels`, `gate_scores`, `population_scores`, adds the gate's and the population check's refusals and, for
    requests that asked, `explanations` (one dict per image); postprocess only turns this into answers."""
    spans: list[tuple[int, int] | None]
    refusals: dict[int, RequestError]
    images: torch.Tensor | None
    explain: list[bool]
    probabilities: np.ndarray | None = None
    labels: np.ndarray | None = None
    gate_scores: np.ndarray | None = None
    population_scores: np.ndarray | None = None
    explanations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def accepted(self) -> list[tuple[int, int, int]]:
        """(request index, start, end) of every request still to be answered."""
        return [(index, *span) for index, span in enumerate(self.spans)
                if span is not None and index not in self.refusals]
