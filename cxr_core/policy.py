"""The request policy: every reason a request may be refused, in the order a request meets them.

`RULES` is the one list (README and docs/serving.md print it; tests/test_policy.py checks that of two broken
rules the earlier one answers): each rule has a name, the HTTP status of its refusal and the `Reason` label of
the CxrRejected metric (a bounded set; rules of one kind share it). A refusal is a `Refusal(rule, message)`
whose message names the problem for that image only; the other requests of the batch go on. The decoder's
own rules (`codec` to `unreadable`, and `empty` for an empty image inside a list) come in the order each
format's decoder meets them. The checks run in three stages:

  - the request (`RequestPolicy.admit`): how the body arrived, its images (`extract_images`), their count;
  - each image (`RequestPolicy.admit_image` -> `decode_image`): the time budget, bytes, format, pixel budget,
    then the decoder's own limits (cxr_core.preprocessing: pixels, decoded bytes, refused codecs), then shape;
  - the model's outputs (`RequestPolicy.judge`): the gate, then the population check.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr_core.population import PopulationSettings, outside, verdict
from cxr_core.preprocessing import MAX_DECODED_BYTES, MAX_IMAGE_PIXELS, EvalPreset, InvalidImageError
from cxr_core.settings import HandlerSettings

ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")  # and DICOM, which Pillow does not open
JSON_IMAGE_KEYS = ("image", "data", "b64", "body")
JSON_LIST_KEYS = ("instances", "images", "inputs")


@dataclass(frozen=True)
class Rule:
    name: str
    status: int
    reason: str  # the CxrRejected metric's Reason label
    refuses: str  # what it refuses, in words
    setting: str  # the handler setting (model-config.yaml) that sets its limit; "" when fixed in code


def _rules(table: str) -> tuple[Rule, ...]:
    rows = [[cell.strip() for cell in line.split("|")] for line in table.strip().splitlines()]
    return tuple(Rule(name, int(status), reason, refuses, setting) for name, status, reason, refuses, setting in rows)


_DECODER_LIMITS = f"over {MAX_IMAGE_PIXELS // 10**6} Mpx, or over {MAX_DECODED_BYTES // 10**6} MB of decoded pixels"
# In the order they are checked: name | status | CxrRejected reason | what it refuses | handler setting
RULES = _rules(f"""
form_data          | 415 | form_data          | a body sent as form data (application/x-www-form-urlencoded) |
empty              | 400 | empty              | a request without image bytes |
base64             | 400 | bad_base64         | a text body that is not base64 |
request_shape      | 400 | bad_request        | JSON without an image, a list of numbers, any other unreadable body |
image_count        | 413 | too_large          | more images in one request than allowed | max_images_per_request
decode_time        | 413 | too_slow           | a request still decoding past its time budget | max_request_seconds
image_bytes        | 413 | too_large          | an image file over the size limit | max_image_bytes
format             | 415 | unsupported_type   | formats other than {', '.join(ACCEPTED_FORMATS)} and DICOM |
pixel_budget       | 413 | too_large          | more pixels than the request has left | max_request_pixels
codec              | 415 | unsupported_type   | RLE-compressed BMP, deflated DICOM, multi-frame DICOM |
image_pixels       | 413 | too_large          | {_DECODER_LIMITS} |
not_an_image       | 400 | not_an_image       | bytes no decoder reads as an image, DICOM without pixel data |
truncated          | 400 | truncated          | truncated or corrupt image data |
unreadable         | 400 | bad_request        | any other file the decoder cannot read |
min_side           | 422 | wrong_shape        | a short side under the minimum | min_side
aspect_ratio       | 422 | wrong_shape        | an aspect ratio over the maximum | max_aspect_ratio
not_a_chest_xray   | 422 | not_a_chest_xray   | what the gate scores as no chest X-ray (photo, document) | ood_gate
outside_population | 422 | outside_population | a chest X-ray unlike the model's training films | population_check
no_explanation     | 501 | bad_request        | an explanation asked of a non-eager archive |
""")
RULE = {rule.name: rule for rule in RULES}
# The decoder (cxr_core.preprocessing) names what is wrong with an image by kind; each kind is one rule.
DECODER_RULES = {"empty": "empty", "too_large": "image_pixels", "unsupported_type": "codec",
                 "not_an_image": "not_an_image", "truncated": "truncated", "unreadable": "unreadable"}


class Refusal(Exception):
    """One request refused by `rule`: its status, a message that names the problem, extra body fields."""

    def __init__(self, rule: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.rule = RULE[rule]
        self.status, self.reason = self.rule.status, self.rule.reason
        self.message = message
        self.details = details or {}


def decode_image(data: bytes, decode: Callable[[Image.Image | bytes], Image.Image], max_bytes: int,
                 prefix: str = "", max_pixels: int | None = None) -> tuple[Image.Image, int]:
    """The one way request bytes become an image, for the handler and the demo page alike (so a file cannot be
    previewed as one image and classified as another): its bytes, Pillow's header probe (accepted formats
    only, and at most `max_pixels`, what is left of the request's pixel budget), then `decode` (which also
    reads DICOM and applies the decoder's limits). Returns the image and the pixels it counted."""
    def over_budget(width: int, height: int) -> Refusal:
        return Refusal("pixel_budget", f"{prefix}{width}x{height} pixels is over what is left of the request's "
                                       f"pixel budget ({max_pixels}); send fewer or smaller images")

    if len(data) > max_bytes:
        raise Refusal("image_bytes", f"{prefix}image of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        opened = Image.open(io.BytesIO(data))  # reads the header only; decoded once, by `decode`
    except Exception:  # noqa: BLE001 - not a format Pillow knows (DICOM, junk): `decode` gives the reason
        opened = None
    if opened is not None and opened.format not in ACCEPTED_FORMATS:
        raise Refusal("format", f"{prefix}unsupported image type {opened.format}; send one of "
                                f"{', '.join(ACCEPTED_FORMATS)}")
    if opened is not None and max_pixels is not None and max_pixels < opened.width * opened.height \
            <= MAX_IMAGE_PIXELS:  # (over MAX_IMAGE_PIXELS, the decoder names the image as too large itself)
        raise over_budget(opened.width, opened.height)
    try:
        image = decode(opened if opened is not None else data)
    except InvalidImageError as error:
        raise Refusal(DECODER_RULES[error.kind], f"{prefix}{error}") from error
    pixels = opened.width * opened.height if opened is not None else image.width * image.height
    if max_pixels is not None and pixels > max_pixels:  # DICOM: known once decoded (its size check came first)
        raise over_budget(image.width, image.height)
    return image, pixels


def extract_images(row: dict[str, Any]) -> list[bytes]:
    """The images of one TorchServe request row, as encoded bytes, in order: the raw body, multipart fields,
    or JSON with base64 (a string, a list, or one of JSON_IMAGE_KEYS / JSON_LIST_KEYS)."""
    if not isinstance(row, dict) or not row:
        raise Refusal("empty", "empty request: no image was sent")
    values = [row["body"]] if "body" in row else ([row["data"]] if "data" in row else list(row.values()))
    images = []
    for value in values:
        if value is None:
            continue
        images.extend([bytes(value)] if isinstance(value, (bytes, bytearray)) else _images_from_json(value))
    if not images or all(len(image) == 0 for image in images):
        raise Refusal("empty", "empty request: no image bytes were sent")
    return images


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise Refusal("base64", "text body is not base64-encoded image data") from error


def _images_from_json(value: Any) -> list[bytes]:
    if isinstance(value, str):
        return [_decode_base64(value)]
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)]
    if isinstance(value, list):
        if value and all(isinstance(item, (int, float)) for item in value):
            raise Refusal("request_shape", "expected image data (bytes or base64), got a list of numbers; send "
                                           "the image file")
        images = []
        for index, item in enumerate(value):
            try:
                images.extend(_images_from_json(item))
            except Refusal as error:
                raise Refusal(error.rule.name, f"image {index}: {error.message}") from error
        return images
    if isinstance(value, dict):
        for key in JSON_LIST_KEYS + JSON_IMAGE_KEYS:
            if key in value:
                return _images_from_json(value[key])
        raise Refusal("request_shape", f"JSON body has no image: expected one of the keys "
                                       f"{JSON_IMAGE_KEYS + JSON_LIST_KEYS}")
    raise Refusal("request_shape", f"unsupported request content of type {type(value).__name__}")


def lift_pillow_pixel_limit() -> None:
    """Turn off Pillow's own decompression-bomb limit in this process (a server's, called where it starts):
    the decoder refuses over MAX_IMAGE_PIXELS first, with a message that names the limit."""
    Image.MAX_IMAGE_PIXELS = None


class RequestPolicy:
    """The rules with a model's limits: `admit` a request's images, `judge` them on the model's outputs."""

    def __init__(self, settings: HandlerSettings, preset: EvalPreset) -> None:
        self.settings, self.preset = settings, preset

    def admit(self, row: dict[str, Any], content_type: str = "") -> list[torch.Tensor]:
        """The model inputs of one request's images; raises the Refusal of the first rule it breaks."""
        if content_type.startswith("application/x-www-form-urlencoded"):
            raise Refusal("form_data", "the image arrived as form data (Content-Type "
                                       "application/x-www-form-urlencoded); send the raw bytes with "
                                       "Content-Type: image/jpeg, image/png or application/octet-stream")
        images = extract_images(row)
        limit = self.settings.max_images_per_request
        if len(images) > limit:
            raise Refusal("image_count", f"{len(images)} images in one request; at most {limit} are accepted")
        # Budgets per request, so that no request can hold its batch past responseTimeout.
        budget, seconds = self.settings.max_request_pixels, self.settings.max_request_seconds
        deadline = time.monotonic() + seconds
        tensors = []
        for index, data in enumerate(images):
            prefix = f"image {index}: " if len(images) > 1 else ""
            if time.monotonic() > deadline:
                raise Refusal("decode_time", f"{prefix}the request took over {seconds} s to decode; send fewer "
                                             "or smaller images")
            tensor, pixels = self.admit_image(data, prefix, budget)
            budget -= pixels
            tensors.append(tensor)
        return tensors

    def admit_image(self, data: bytes, prefix: str, max_pixels: int) -> tuple[torch.Tensor, int]:
        """The model input of one image and the pixels it cost the request's budget."""
        image, pixels = decode_image(data, self.preset.decode, self.settings.max_image_bytes, prefix, max_pixels)
        width, height = image.size
        if min(width, height) < self.settings.min_side:
            raise Refusal("min_side", f"{prefix}image is {width}x{height} pixels; a chest X-ray needs at least "
                                      f"{self.settings.min_side} pixels on its short side")
        if max(width, height) / min(width, height) > self.settings.max_aspect_ratio:
            raise Refusal("aspect_ratio", f"{prefix}image is {width}x{height} pixels: an aspect ratio above "
                                          f"{self.settings.max_aspect_ratio}:1 is not a chest X-ray")
        return self.preset(image), pixels

    def judge(self, gate_scores: np.ndarray | None, population_scores: np.ndarray | None, gate_limit: float | None,
              population: PopulationSettings | None, population_mode: str) -> Refusal | None:
        """The refusal of one request's images on the model's outputs (the gate first), or None."""
        if gate_scores is not None and (gate_scores > gate_limit).any():
            worst = int(gate_scores.argmax())
            details = {"gate_score": round(float(gate_scores[worst]), 4), "gate_limit": round(gate_limit, 4)}
            return Refusal("not_a_chest_xray", "not a chest X-ray", _image_index(details, worst, gate_scores))
        if population_mode == "refuse" and population_scores is not None and \
                outside(population_scores, population.limit).any():
            worst = int(population_scores.argmax())
            details = {"population": verdict(float(population_scores[worst]), population, "refuse"),
                       **population.whom()}
            return Refusal("outside_population", "outside the model's population",
                           _image_index(details, worst, population_scores))
        return None


def _image_index(details: dict[str, Any], worst: int, scores: np.ndarray) -> dict[str, Any]:
    """Name the image that decided a refusal when the request carried several."""
    return {**details, "image": worst} if len(scores) > 1 else details
