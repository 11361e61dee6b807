"""TorchServe handler for chest X-ray classifiers: one handler for every backend (eager checkpoint,
TorchScript, ONNX Runtime fp32/int8, AOTInductor), using the same `cxr.preprocessing` code as training.

Request shapes accepted (each TorchServe request may carry one or several images):
  - raw image bytes as the body (JPEG, PNG incl. 16-bit, TIFF, BMP, DICOM; grayscale or colour);
  - multipart/form-data with one image per field;
  - JSON: a base64 string, a list of them, or {"image"|"data"|"b64": ...}, {"instances"|"images": [...]}.
One image gets one answer object; several images get a list, in order. A bad image fails its own request
with a 4xx status and a message naming the problem; the other requests of the batch are answered.

TorchServe's own `BaseHandler.handle` drives it (with its describe and profiler paths): `preprocess` reads and
checks every request into a `PreparedBatch`, `inference` runs the model, the gate and any Grad-CAM on it,
`postprocess` turns it into one answer (or refusal) per request. The module defines this one class, which
TorchServe instantiates once per worker.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from cxr.backends import TorchBackend, load_backend
from cxr.explain import CAM_LAYERS, grad_cam, model_view, overlay_png
from cxr.gate import GATE_FILE, OodGate
from cxr.inputs import PreparedBatch, RequestError, decode_image, extract_images
from cxr.population import MODES, verdict
from cxr.preprocessing import EvalPreset

log = logging.getLogger(__name__)

DEFAULTS = {"threads": None, "fp16": False, "max_images_per_request": 16, "max_image_bytes": 16 * 1024 * 1024,
            "min_side": 64, "max_aspect_ratio": 4.0, "ood_gate": True, "onnx_spin": True,
            "population_check": "refuse", "max_request_pixels": 72_000_000, "max_request_seconds": 10.0}


class XrayHandler(BaseHandler):
    """initialize -> preprocess -> inference -> postprocess, with a status per request of the batch."""

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        manifest = context.manifest
        self.settings = {**DEFAULTS, **((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})}
        if self.settings["population_check"] not in MODES:
            raise ValueError(f"handler setting population_check: {self.settings['population_check']!r} is not one "
                             f"of {', '.join(MODES)}")
        gpu_id = properties.get("gpu_id")
        device = f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu"
        model_path = os.path.join(properties["model_dir"], manifest["model"]["serializedFile"])
        self.backend = load_backend(model_path, device, threads=self.settings["threads"], half=self.settings["fp16"],
                                    spin=self.settings["onnx_spin"])
        self.config = self.backend.config
        self.preset = EvalPreset(self.config.preprocessing)
        self.class_names = list(self.config.class_names)
        self.threshold = self.config.threshold
        self.population = self.config.population  # None: this model has no population check
        if self.population is None and self.settings["population_check"] != "off":
            log.warning("%s has no population check: answers say population check 'absent'", model_path)
        self.model_name = getattr(context, "model_name", None) or manifest["model"].get("modelName")
        self.version = manifest["model"].get("modelVersion")
        self.manifest = manifest
        gate_path = os.path.join(properties["model_dir"], GATE_FILE)
        self.gate = OodGate.load(gate_path, device) if self.settings["ood_gate"] and os.path.exists(gate_path) \
            else None
        if self.settings["ood_gate"] and self.gate is None:
            log.warning("ood_gate is on but the archive has no %s: every image will be classified", GATE_FILE)
        self.initialized = True
        log.info("loaded %s (%s backend on %s, gate %s, population check %s)", model_path, self.backend.name,
                 device, "on" if self.gate else "off",
                 self.settings["population_check"] if self.population else "absent")

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

    def preprocess(self, data: list[dict[str, Any]]) -> PreparedBatch:
        """Read and check every request of the batch; a refused request keeps its RequestError."""
        started = time.perf_counter()
        spans, refusals, tensors = [], {}, []
        for index, row in enumerate(data):
            prepared = self._prepare_request(row, index)
            if isinstance(prepared, RequestError):
                spans.append(None)
                refusals[index] = prepared
            else:
                spans.append((len(tensors), len(tensors) + len(prepared)))
                tensors.extend(prepared)
        batch = PreparedBatch(spans, refusals, torch.stack(tensors) if tensors else None,
                              [self._explain_requested(index) for index in range(len(data))])
        self._metric("add_time", "CxrPreprocessTime", round((time.perf_counter() - started) * 1000, 3), {}, "ms")
        return batch

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
        """The request's preprocessed images, or the RequestError that refuses it."""
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
            prefix, prepared = len(images) > 1, []
            # Budgets per request, so that no request can hold its batch past responseTimeout: pixels decoded
            # (checked on each header before decoding) and seconds spent (checked before each image).
            budget = self.settings["max_request_pixels"]
            deadline = time.monotonic() + self.settings["max_request_seconds"]
            for i, data in enumerate(images):
                label = f"image {i}: " if prefix else ""
                if time.monotonic() > deadline:
                    raise RequestError(413, f"{label}the request took over {self.settings['max_request_seconds']} s "
                                            "to decode; send fewer or smaller images", "too_slow")
                tensor, pixels = self._prepare_image(data, label, budget)
                budget -= pixels
                prepared.append(tensor)
            return prepared
        except RequestError as error:
            return error
        except Exception as error:  # noqa: BLE001 - one odd request must never take down the batch
            log.exception("unexpected error while reading a request")
            return RequestError(400, f"could not read the request: {error}")

    def _prepare_image(self, data: bytes, prefix: str, max_pixels: int) -> tuple[torch.Tensor, int]:
        """The model input of one image and the pixels it cost the request's budget."""
        image, pixels = decode_image(data, self.preset.decode, self.settings["max_image_bytes"], prefix, max_pixels)
        width, height = image.size
        if min(width, height) < self.settings["min_side"]:
            raise RequestError(422, f"{prefix}image is {width}x{height} pixels; a chest X-ray needs at least "
                                    f"{self.settings['min_side']} pixels on its short side")
        if max(width, height) / min(width, height) > self.settings["max_aspect_ratio"]:
            raise RequestError(422, f"{prefix}image is {width}x{height} pixels: an aspect ratio above "
                                    f"{self.settings['max_aspect_ratio']}:1 is not a chest X-ray")
        return self.preset(image), pixels

    def inference(self, batch: PreparedBatch, *args: Any, **kwargs: Any) -> PreparedBatch:
        """One forward pass over every accepted image of the batch (the population check is part of it); then
        the gate (probability of not being a chest X-ray: a request with any image over its limit is refused),
        the population check (refused when set to `refuse`) and Grad-CAM where it was asked for."""
        if batch.images is None:
            return batch
        started = time.perf_counter()
        batch.probabilities, population = self.backend.run(batch.images)
        if self.population is not None and self.settings["population_check"] != "off":
            batch.population_scores = population
        batch.labels = self.config.decide(batch.probabilities)
        if self.gate is not None:
            config = self.preset.config
            batch.gate_scores = self.gate.scores(batch.images, config.mean[0], config.std[0]).numpy()
        for index, start, end in batch.accepted():
            if batch.gate_scores is not None and (batch.gate_scores[start:end] > self.gate.limit).any():
                batch.refusals[index] = self._not_an_xray(batch.gate_scores[start:end])
            elif self.settings["population_check"] == "refuse" and batch.population_scores is not None and \
                    (batch.population_scores[start:end] > self.population.limit).any():
                batch.refusals[index] = self._outside_population(batch.population_scores[start:end])
            elif batch.explain[index]:
                try:
                    batch.explanations[index] = self._explain(batch.images[start:end], batch.labels[start:end])
                except RequestError as error:
                    batch.refusals[index] = error
        self._metric("add_time", "CxrInferenceTime", round((time.perf_counter() - started) * 1000, 3), {}, "ms")
        return batch

    def explain_handle(self, data_preprocess: PreparedBatch, raw_data: Any) -> list[Any]:
        """BaseHandler's /explanations path: explanations are asked per request (the `explain` header), so
        the same inference and answers serve both endpoints."""
        return self.postprocess(self.inference(data_preprocess))

    def describe_handle(self) -> dict[str, Any]:
        """What `GET /models/<name>?customized=true` adds: the model's classes, threshold, preprocessing, who it
        is for (its intended population and model card) and how its population check is set."""
        described = {"class_names": self.class_names, "positive_class": self.config.positive_class,
                     "threshold": self.threshold, "preprocessing": self.config.preprocessing.to_dict(),
                     "backend": self.backend.name, "gate": self.gate is not None,
                     "population_check": self.settings["population_check"] if self.population else "absent"}
        if self.population is not None:
            described.update(intended_population=self.population.intended_population,
                             model_card=self.population.model_card, population_limit=self.population.limit,
                             population_kind=self.population.kind)
        return described

    def postprocess(self, batch: PreparedBatch) -> list[Any]:
        """One answer per request: a refusal with its status, or one answer per image (a list for several)."""
        output = []
        for index, span in enumerate(batch.spans):
            if index in batch.refusals:
                error = batch.refusals[index]
                self._metric("add_counter", "CxrRejected", 1, {"Reason": error.reason})
                output.append(self._refuse(index, error))
                continue
            start, end = span
            answers = [self._answer(batch.probabilities[k], batch.labels[k],
                                    None if batch.gate_scores is None else float(batch.gate_scores[k]),
                                    None if batch.population_scores is None else float(batch.population_scores[k]))
                       for k in range(start, end)]
            for extra, answer in zip(batch.explanations.get(index, [{}] * len(answers)), answers, strict=True):
                answer.update(extra)
                self._metric("add_counter", "CxrPredictions", 1, {"Label": answer["label"]})
            output.append(answers[0] if len(answers) == 1 else answers)
        return output

    def _not_an_xray(self, scores: np.ndarray) -> RequestError:
        """422 for a request with an image the gate refuses; the body gives the score that decided it."""
        worst = int(scores.argmax())
        details = {"gate_score": round(float(scores[worst]), 4), "gate_limit": round(self.gate.limit, 4)}
        if len(scores) > 1:
            details["image"] = worst
        return RequestError(422, "not a chest X-ray", "not_a_chest_xray", details)

    def _outside_population(self, scores: np.ndarray) -> RequestError:
        """422 for a request with an X-ray unlike the model's training population: the body says whom the model
        is for and where its card is."""
        worst = int(scores.argmax())
        details = {"population": verdict(float(scores[worst]), self.population, "refuse"),
                   "intended_population": self.population.intended_population,
                   "model_card": self.population.model_card}
        if len(scores) > 1:
            details["image"] = worst
        return RequestError(422, "outside the model's population", "outside_population", details)

    def _explain_requested(self, index: int) -> bool:
        try:
            return str(self.context.get_request_header(index, "explain")) == "True"
        except Exception:  # noqa: BLE001 - fake contexts and predictions carry no such header
            return False

    def _explain(self, tensors: torch.Tensor, labels: np.ndarray) -> list[dict[str, Any]]:
        """Grad-CAM for each image's predicted class, with the eager model of this archive."""
        if not isinstance(self.backend, TorchBackend) or self.backend.name != "eager" or \
                self.config.arch not in CAM_LAYERS:
            raise RequestError(501, f"this archive ({self.backend.name} backend) does not explain; send "
                                    "explanations to the eager archive (pneumonia_eager)")
        heatmaps = grad_cam(self.backend.model, self.config.arch, tensors.to(self.backend.device),
                            [int(label) for label in labels])
        config = self.preset.config
        explained = []
        for tensor, heatmap, label in zip(tensors, heatmaps, labels, strict=True):
            gray = model_view(tensor, config.mean[0], config.std[0])
            explained.append({"explained_class": self.class_names[int(label)],
                              "heatmap": np.round(heatmap, 3).tolist(), "overlay_png": overlay_png(gray, heatmap)})
        return explained

    def _answer(self, probabilities: np.ndarray, label: int, gate_score: float | None = None,
                population_score: float | None = None) -> dict[str, Any]:
        gate = {"ran": False} if gate_score is None else \
            {"ran": True, "score": round(gate_score, 4), "limit": round(self.gate.limit, 4)}
        population = verdict(population_score, self.population, self.settings["population_check"])
        if population["inside"] is False:  # `warn`: answered, but say whom the model is for
            population.update(intended_population=self.population.intended_population,
                              model_card=self.population.model_card)
        return {
            "model": self.model_name,
            "version": self.version,
            "label": self.class_names[int(label)],
            "probabilities": {name: round(float(p), 6) for name, p in zip(self.class_names, probabilities,
                                                                            strict=True)},
            "threshold": self.threshold,
            "gate": gate,
            "population": population,
        }

    def _refuse(self, index: int, error: RequestError) -> dict[str, Any]:
        """Give request `index` of the batch its own status; the body names the problem."""
        if self.context is not None and hasattr(self.context, "set_response_status"):
            self.context.set_response_status(code=error.status, phrase=error.message, idx=index)
        return {"code": error.status, "error": error.message, **error.details}
