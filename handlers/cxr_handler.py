"""TorchServe handler for chest X-ray classifiers: one handler for every backend (eager checkpoint,
TorchScript, ONNX Runtime fp32/int8), using the same `cxr.preprocessing` code as training.

Request shapes accepted (each TorchServe request may carry one or several images):
  - raw image bytes as the body (JPEG, PNG incl. 16-bit, TIFF, BMP, DICOM; grayscale or colour);
  - multipart/form-data with one image per field;
  - JSON: a base64 string, a list of them, or {"image"|"data"|"b64": ...}, {"instances"|"images": [...]}.
One image gets one answer object; several images get a list, in order. A bad image fails its own request
with a 4xx status and a message naming the problem; the other requests of the batch are answered.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from cxr.backends import TorchBackend, load_backend
from cxr.explain import CAM_LAYERS, grad_cam, model_view, overlay_png
from cxr.gate import GATE_FILE, OodGate
from cxr.metrics import predict_labels
from cxr.preprocessing import EvalPreset, InvalidImageError, PreprocessConfig, load_image

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
JSON_IMAGE_KEYS = ("image", "data", "b64", "body")
JSON_LIST_KEYS = ("instances", "images", "inputs")
DEFAULTS = {"threads": None, "fp16": False, "max_images_per_request": 16, "max_image_bytes": 16 * 1024 * 1024,
            "min_side": 64, "max_aspect_ratio": 4.0, "ood_gate": True, "onnx_spin": True}


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


class XrayHandler(BaseHandler):
    """initialize -> preprocess -> inference -> postprocess, with a status per request of the batch."""

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        manifest = context.manifest
        self.settings = {**DEFAULTS, **((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})}
        gpu_id = properties.get("gpu_id")
        device = f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu"
        model_path = os.path.join(properties["model_dir"], manifest["model"]["serializedFile"])
        self.backend = load_backend(model_path, device, threads=self.settings["threads"], half=self.settings["fp16"],
                                    spin=self.settings["onnx_spin"])
        self.config = self.backend.config
        self.preset = EvalPreset(PreprocessConfig.from_dict(self.config["preprocessing"]))
        self.class_names = list(self.config["class_names"])
        self.threshold = self.config.get("threshold")
        positive = self.config.get("positive_class")
        self.positive_index = self.class_names.index(positive) if positive is not None else None
        self.model_name = getattr(context, "model_name", None) or manifest["model"].get("modelName")
        self.version = manifest["model"].get("modelVersion")
        self.manifest = manifest
        gate_path = os.path.join(properties["model_dir"], GATE_FILE)
        self.gate = OodGate.load(gate_path, device) if self.settings["ood_gate"] and os.path.exists(gate_path) \
            else None
        if self.settings["ood_gate"] and self.gate is None:
            log.warning("ood_gate is on but the archive has no %s: every image will be classified", GATE_FILE)
        self.initialized = True
        log.info("loaded %s (%s backend on %s, gate %s)", model_path, self.backend.name, device,
                 "on" if self.gate else "off")

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        self.context = context
        started = time.perf_counter()
        prepared = self.preprocess(data)
        preprocessed = time.perf_counter()
        probabilities, gate_scores = self.inference(prepared)
        inferred = time.perf_counter()
        output = self.postprocess(prepared, probabilities, gate_scores)
        self._metric("add_time", "CxrPreprocessTime", round((preprocessed - started) * 1000, 3), {}, "ms")
        self._metric("add_time", "CxrInferenceTime", round((inferred - preprocessed) * 1000, 3), {}, "ms")
        return output

    def _metric(self, method: str, name: str, value: float, dimensions: dict[str, str], unit: str | None = None):
        """Report a custom metric through TorchServe's metrics API (Prometheus on port 8082)."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            from ts.metrics.dimension import Dimension

            dims = [Dimension(key, value) for key, value in dimensions.items()]
            if unit is None:
                getattr(metrics, method)(name, value, None, dims)
            else:
                getattr(metrics, method)(name, value, None, unit, dims)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            log.exception("could not record metric %s", name)

    def preprocess(self, data: list[dict[str, Any]]) -> list[list[torch.Tensor] | RequestError]:
        """One entry per request: its image tensors, or the RequestError that refuses it."""
        return [self._prepare_request(row, index) for index, row in enumerate(data)]

    def _content_type(self, index: int) -> str:
        try:
            headers = self.context.get_all_request_header(index) or {}
        except Exception:  # noqa: BLE001 - fake contexts and older frontends have no headers
            return ""
        for name, value in headers.items():
            if str(name).lower() == "content-type":
                return str(value).lower()
        return ""

    def _prepare_request(self, row: dict[str, Any], index: int) -> list[torch.Tensor] | RequestError:
        try:
            if self._content_type(index).startswith("application/x-www-form-urlencoded"):
                raise RequestError(415, "the image arrived as form data (Content-Type "
                                        "application/x-www-form-urlencoded); send the raw bytes with "
                                        "Content-Type: image/jpeg, image/png or application/octet-stream",
                                   "form_data")
            images = extract_images(row)
            limit = self.settings["max_images_per_request"]
            if len(images) > limit:
                raise RequestError(413, f"{len(images)} images in one request; at most {limit} are accepted")
            prefix = len(images) > 1
            return [self._prepare_image(image, f"image {i}: " if prefix else "") for i, image in enumerate(images)]
        except RequestError as error:
            return error
        except Exception as error:  # noqa: BLE001 - one odd request must never take down the batch
            log.exception("unexpected error while reading a request")
            return RequestError(400, f"could not read the request: {error}")

    def _prepare_image(self, data: bytes, prefix: str) -> torch.Tensor:
        limit = self.settings["max_image_bytes"]
        if len(data) > limit:
            raise RequestError(413, f"{prefix}image of {len(data)} bytes exceeds the limit of {limit} bytes")
        try:
            opened = Image.open(io.BytesIO(data))  # reads the header only; decoded once, by load_image
        except Exception:  # noqa: BLE001 - not a format Pillow knows (DICOM, junk): load_image gives the reason
            opened = None
        if opened is not None and opened.format not in ACCEPTED_FORMATS:
            raise RequestError(415, f"{prefix}unsupported image type {opened.format}; send one of "
                                    f"{', '.join(ACCEPTED_FORMATS)}")
        try:
            image = load_image(opened if opened is not None else data, self.preset.decode_size)
        except InvalidImageError as error:
            reason = None if error.kind == "unreadable" else error.kind  # unreadable counts as bad_request
            raise RequestError(413 if error.kind == "too_large" else 400, f"{prefix}{error}", reason) from error
        width, height = image.size
        if min(width, height) < self.settings["min_side"]:
            raise RequestError(422, f"{prefix}image is {width}x{height} pixels; a chest X-ray needs at least "
                                    f"{self.settings['min_side']} pixels on its short side")
        if max(width, height) / min(width, height) > self.settings["max_aspect_ratio"]:
            raise RequestError(422, f"{prefix}image is {width}x{height} pixels: an aspect ratio above "
                                    f"{self.settings['max_aspect_ratio']}:1 is not a chest X-ray")
        return self.preset(image)

    def inference(self, prepared: list[list[torch.Tensor] | RequestError]) -> tuple[np.ndarray, np.ndarray | None]:
        """One forward pass over every good image of every request in the batch, and the gate's scores
        (probability of not being a chest X-ray; None when the gate is off)."""
        tensors = [tensor for item in prepared if not isinstance(item, RequestError) for tensor in item]
        if not tensors:
            return np.zeros((0, len(self.class_names)), dtype=np.float32), None
        batch = torch.stack(tensors)
        config = self.preset.config
        gate_scores = self.gate.scores(batch, config.mean[0], config.std[0]).numpy() if self.gate else None
        return self.backend.predict(batch), gate_scores

    def postprocess(self, prepared: list[list[torch.Tensor] | RequestError], probabilities: np.ndarray,
                    gate_scores: np.ndarray | None = None) -> list[Any]:
        labels = predict_labels(probabilities, self.positive_index, self.threshold)
        output, cursor = [], 0
        for index, item in enumerate(prepared):
            if not isinstance(item, RequestError):  # this request's rows of the batch: start .. cursor
                start, cursor = cursor, cursor + len(item)
                scores = None if gate_scores is None else gate_scores[start:cursor]
                if scores is not None and (scores > self.gate.limit).any():
                    item = self._not_an_xray(scores)
            if isinstance(item, RequestError):
                self._metric("add_counter", "CxrRejected", 1, {"Reason": item.reason})
                output.append(self._refuse(index, item))
                continue
            answers = [self._answer(probabilities[start + k], labels[start + k],
                                    None if scores is None else float(scores[k])) for k in range(len(item))]
            for answer in answers:
                self._metric("add_counter", "CxrPredictions", 1, {"Label": answer["label"]})
            if self._explain_requested(index):
                try:
                    answers = self._explain(item, answers)
                except RequestError as error:
                    output.append(self._refuse(index, error))
                    continue
            output.append(answers[0] if len(answers) == 1 else answers)
        return output

    def _not_an_xray(self, scores: np.ndarray) -> RequestError:
        """422 for a request with an image the gate refuses; the body gives the score that decided it."""
        worst = int(scores.argmax())
        details = {"gate_score": round(float(scores[worst]), 4), "gate_limit": round(self.gate.limit, 4)}
        if len(scores) > 1:
            details["image"] = worst
        return RequestError(422, "not a chest X-ray", "not_a_chest_xray", details)

    def _explain_requested(self, index: int) -> bool:
        try:
            return str(self.context.get_request_header(index, "explain")) == "True"
        except Exception:  # noqa: BLE001 - fake contexts and predictions carry no such header
            return False

    def _explain(self, tensors: list[torch.Tensor], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Grad-CAM for each image's predicted class, with the eager model of this archive."""
        if not isinstance(self.backend, TorchBackend) or self.backend.name != "eager" or \
                self.config["arch"] not in CAM_LAYERS:
            raise RequestError(501, f"this archive ({self.backend.name} backend) does not explain; send "
                                    "explanations to the eager archive (pneumonia_eager)")
        batch = torch.stack(tensors).to(self.backend.device)
        targets = [self.class_names.index(answer["label"]) for answer in answers]
        heatmaps = grad_cam(self.backend.model, self.config["arch"], batch, targets)
        config = self.preset.config
        explained = []
        for tensor, heatmap, answer in zip(tensors, heatmaps, answers, strict=True):
            gray = model_view(tensor, config.mean[0], config.std[0])
            explained.append({**answer, "explained_class": answer["label"],
                              "heatmap": np.round(heatmap, 3).tolist(), "overlay_png": overlay_png(gray, heatmap)})
        return explained

    def _answer(self, probabilities: np.ndarray, label: int, gate_score: float | None = None) -> dict[str, Any]:
        gate = {"ran": False} if gate_score is None else \
            {"ran": True, "score": round(gate_score, 4), "limit": round(self.gate.limit, 4)}
        return {
            "model": self.model_name,
            "version": self.version,
            "label": self.class_names[int(label)],
            "probabilities": {name: round(float(p), 6) for name, p in zip(self.class_names, probabilities,
                                                                            strict=True)},
            "threshold": self.threshold,
            "gate": gate,
        }

    def _refuse(self, index: int, error: RequestError) -> dict[str, Any]:
        """Give request `index` of the batch its own status; the body names the problem."""
        if self.context is not None and hasattr(self.context, "set_response_status"):
            self.context.set_response_status(code=error.status, phrase=error.message, idx=index)
        return {"code": error.status, "error": error.message, **error.details}


_service = XrayHandler()


def handle(data: list[dict[str, Any]], context: Any) -> list[Any] | None:
    """Module-level entry point (TorchServe also accepts the class; this keeps one instance per worker)."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
