"""TorchServe handler for chest X-ray classifiers: one handler for every backend (eager checkpoint,
TorchScript, ONNX Runtime fp32/int8, AOTInductor), a thin adapter between TorchServe and `cxr_core`:

  admit (cxr_core.policy: every request's images checked and preprocessed, or refused)
  -> run (cxr_core.served: one forward pass with the population check, the decision and the gate)
  -> judge (cxr_core.policy: the gate's and the population check's refusals)
  -> answer (one answer object per image, a list for several; a refusal with its own 4xx per request).

Request shapes accepted: raw image bytes as the body (JPEG, PNG incl. 16-bit, TIFF, BMP, WebP, DICOM),
multipart/form-data with one image per field, or JSON with base64 (cxr_core.policy.extract_images). A bad
image fails its own request; the other requests of the batch are answered. TorchServe's own
`BaseHandler.handle` drives it (with its describe and profiler paths); the module defines this one class,
which TorchServe instantiates once per worker.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from cxr_core.gate import GATE_FILE
from cxr_core.inputs import PreparedBatch
from cxr_core.policy import Refusal, RequestPolicy, lift_pillow_pixel_limit
from cxr_core.served import Outputs, ServedModel
from cxr_core.settings import HandlerSettings

log = logging.getLogger(__name__)


class XrayHandler(BaseHandler):
    """initialize -> preprocess (admit) -> inference (run, judge) -> postprocess (answer), with a status per
    request of the batch."""

    def initialize(self, context: Any) -> None:
        lift_pillow_pixel_limit()
        properties, manifest = context.system_properties, context.manifest
        settings = HandlerSettings.from_yaml((getattr(context, "model_yaml_config", None) or {}).get("handler"))
        gpu_id = properties.get("gpu_id")
        device = f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu"
        model_path = os.path.join(properties["model_dir"], manifest["model"]["serializedFile"])
        self.served = ServedModel.load(model_path, os.path.join(properties["model_dir"], GATE_FILE), device,
                                       settings)
        self.policy = RequestPolicy(settings, self.served.preset)
        self.model_name = getattr(context, "model_name", None) or manifest["model"].get("modelName")
        self.version = manifest["model"].get("modelVersion")
        self.manifest = manifest
        self.initialized = True
        log.info("loaded %s (%s backend on %s, gate %s, population check %s)", model_path,
                 self.served.backend.name, device, "on" if self.served.gate else "off", self.served.population_mode)

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
        """Read and check every request of the batch; a refused request keeps its Refusal."""
        started = time.perf_counter()
        spans, refusals, tensors = [], {}, []
        for index, row in enumerate(data):
            prepared = self._admit(row, index)
            if isinstance(prepared, Refusal):
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

    def _admit(self, row: dict[str, Any], index: int) -> list[torch.Tensor] | Refusal:
        """The request's model inputs, or the Refusal that refuses it."""
        try:
            return self.policy.admit(row, self._content_type(index))
        except Refusal as refusal:
            return refusal
        except Exception as error:  # noqa: BLE001 - one odd request must never take down the batch
            log.exception("unexpected error while reading a request")
            return Refusal("request_shape", f"could not read the request: {error}")

    def inference(self, batch: PreparedBatch, *args: Any, **kwargs: Any) -> PreparedBatch:
        """One forward pass over every admitted image of the batch; then each request is judged (the gate,
        then the population check) and explained where it asked."""
        if batch.images is None:
            return batch
        started = time.perf_counter()
        batch.outputs = self.served.run(batch.images)
        gate_limit = self.served.gate.limit if self.served.gate is not None else None
        for index, start, end in batch.accepted():
            gate_scores, population_scores = batch.scores(start, end)
            refusal = self.policy.judge(gate_scores=gate_scores, population_scores=population_scores,
                                        gate_limit=gate_limit, population=self.served.population,
                                        population_mode=self.served.population_mode)
            if refusal is not None:
                batch.refusals[index] = refusal
            elif batch.explain[index]:
                try:
                    batch.explanations[index] = self.served.explain(batch.images[start:end],
                                                                    batch.outputs.labels[start:end])
                except Refusal as refused:
                    batch.refusals[index] = refused
        self._metric("add_time", "CxrInferenceTime", round((time.perf_counter() - started) * 1000, 3), {}, "ms")
        return batch

    def explain_handle(self, data_preprocess: PreparedBatch, raw_data: Any) -> list[Any]:
        """BaseHandler's /explanations path: explanations are asked per request (the `explain` header), so
        the same inference and answers serve both endpoints."""
        return self.postprocess(self.inference(data_preprocess))

    def describe_handle(self) -> dict[str, Any]:
        """What `GET /models/<name>?customized=true` adds: the model's classes, threshold, preprocessing, who it
        is for (its intended population and model card) and how its population check is set."""
        return self.served.describe()

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
            answers = [self._answer(batch.outputs, k) for k in range(start, end)]
            for extra, answer in zip(batch.explanations.get(index, [{}] * len(answers)), answers, strict=True):
                answer.update(extra)
                self._metric("add_counter", "CxrPredictions", 1, {"Label": answer["label"]})
            output.append(answers[0] if len(answers) == 1 else answers)
        return output

    def _explain_requested(self, index: int) -> bool:
        try:
            return str(self.context.get_request_header(index, "explain")) == "True"
        except Exception:  # noqa: BLE001 - fake contexts and predictions carry no such header
            return False

    def _answer(self, outputs: Outputs, row: int) -> dict[str, Any]:
        return {"model": self.model_name, "version": self.version, **self.served.answer(outputs, row)}

    def _refuse(self, index: int, error: Refusal) -> dict[str, Any]:
        """Give request `index` of the batch its own status; the body names the problem."""
        if self.context is not None and hasattr(self.context, "set_response_status"):
            self.context.set_response_status(code=error.status, phrase=error.message, idx=index)
        return {"code": error.status, "error": error.message, **error.details}
