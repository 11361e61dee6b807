"""A small client for our TorchServe: predictions and health over REST or gRPC, token-aware, with timeouts
and retries on transient errors (connection refused, 503, gRPC UNAVAILABLE).

    client = Client.from_key_file("logs/serve/key_file.json")
    client.predict(open("xray.jpeg", "rb").read(), protocol="grpc")
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr.server import DEFAULT_PORTS, read_key_file


class _Transient(Exception):
    """A failure worth retrying; `error` is what the caller gets when the retries run out."""

    def __init__(self, error: PredictionError) -> None:
        super().__init__(str(error))
        self.error = error


class PredictionError(Exception):
    """The server refused a request; `status` is the HTTP status (gRPC errors are mapped to it), `details` the
    rest of the refusal's JSON body (e.g. the population check's `population`, `intended_population`)."""

    def __init__(self, status: int, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.details = details or {}


# TorchServe maps HTTP statuses to gRPC codes; this maps them back for one error type on both protocols.
_GRPC_TO_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
                 "RESOURCE_EXHAUSTED": 413, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
                 "INTERNAL": 500, "FAILED_PRECONDITION": 422}


class Client:
    def __init__(self, keys: dict[str, str], host: str = "127.0.0.1", ports: dict[str, int] | None = None,
                 timeout: float = 30.0, retries: int = 2) -> None:
        self.keys, self.host = keys, host
        self.ports = {**DEFAULT_PORTS, **(ports or {})}
        self.timeout, self.retries = timeout, retries
        self._channels: dict[int, Any] = {}

    @classmethod
    def from_key_file(cls, path: str | Path = "logs/serve/key_file.json", **options: Any) -> Client:
        return cls(read_key_file(path), **options)

    def _retrying(self, attempt_once: Callable[[], Any]) -> Any:
        """Run `attempt_once`; when it raises `_Transient` (connection refused, 503, gRPC UNAVAILABLE), try again
        with exponential back-off, at most `retries` times, then raise the error it carries."""
        for attempt in range(self.retries + 1):
            try:
                return attempt_once()
            except _Transient as transient:
                if attempt == self.retries:
                    raise transient.error from transient.__cause__
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    # --- REST -------------------------------------------------------------------------------------------
    def _rest(self, path: str, body: bytes | None = None, api: str = "inference", method: str | None = None,
              content_type: str = "application/octet-stream") -> Any:
        headers = {"Authorization": f"Bearer {self.keys[api]}"}
        if body is not None:
            headers["Content-Type"] = content_type
        url = f"http://{self.host}:{self.ports[api]}{path}"

        def once() -> Any:
            request = urllib.request.Request(url, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as error:
                text = error.read().decode(errors="replace")
                try:
                    payload = json.loads(text)
                    message = payload.get("error") or payload.get("message") or text
                except (ValueError, AttributeError):
                    payload, message = {}, text
                details = {k: v for k, v in payload.items() if k not in ("code", "error")} \
                    if isinstance(payload, dict) else {}
                refused = PredictionError(error.code, message, details)
                raise (_Transient(refused) if error.code == 503 else refused) from error
            except (urllib.error.URLError, ConnectionError) as error:
                raise _Transient(PredictionError(503, f"cannot reach {url}: {error}")) from error

        return self._retrying(once)

    # --- gRPC -------------------------------------------------------------------------------------------
    def _grpc_call(self, api: str, method: str, request: Any) -> Any:
        import grpc

        from cxr.grpc_stubs import load

        stubs = load()
        port = self.ports[f"grpc_{api}"]
        if port not in self._channels:
            self._channels[port] = grpc.insecure_channel(f"{self.host}:{port}")
        module = stubs["inference_pb2_grpc" if api == "inference" else "management_pb2_grpc"]
        service = getattr(module, "InferenceAPIsServiceStub" if api == "inference" else
                          "ManagementAPIsServiceStub")(self._channels[port])
        metadata = (("authorization", f"Bearer {self.keys[api]}"),)

        def once() -> Any:
            try:
                return getattr(service, method)(request, metadata=metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                code = error.code().name
                details = error.details() or code
                if code == "UNAVAILABLE" and "connect" in details.lower():  # the same words as REST's refusal
                    details = f"cannot reach {self.host}:{port}: {details}"
                refused = PredictionError(_GRPC_TO_HTTP.get(code, 500), details)
                raise (_Transient(refused) if code == "UNAVAILABLE" else refused) from error

        return self._retrying(once)

    # --- calls ------------------------------------------------------------------------------------------
    def predict(self, image: bytes, model: str = "pneumonia", version: str | None = None,
                protocol: str = "rest") -> Any:
        """The model's JSON answer for one encoded image (same shape on both protocols)."""
        if protocol == "grpc":
            from cxr.grpc_stubs import load

            request = load()["inference_pb2"].PredictionsRequest(model_name=model, model_version=version or "",
                                                                  input={"data": image})
            answer = json.loads(self._grpc_call("inference", "Predictions", request).prediction)
            # TorchServe's gRPC frontend returns a handler's per-request 4xx as an OK call with its body.
            if isinstance(answer, dict) and "error" in answer and "code" in answer:
                raise PredictionError(int(answer["code"]), answer["error"],
                                      {k: v for k, v in answer.items() if k not in ("code", "error")})
            return answer
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        return self._rest(path, image)

    def explain(self, image: bytes, model: str = "pneumonia_eager") -> dict[str, Any]:
        """Prediction plus Grad-CAM `heatmap` and base64 `overlay_png` (REST only: TorchServe 0.12's
        inference.proto has no explanations call)."""
        return self._rest(f"/explanations/{model}", image)

    def ping(self, protocol: str = "rest") -> str:
        if protocol == "grpc":
            from google.protobuf import empty_pb2

            return json.loads(self._grpc_call("inference", "Ping", empty_pb2.Empty()).health)["status"]
        return self._rest("/ping")["status"]

    def models(self) -> list[dict[str, Any]]:
        """Every registered model with its versions and workers (management REST API)."""
        listed = self._rest("/models", api="management")["models"]
        return [entry for model in listed for entry in self._rest(f"/models/{model['modelName']}/all",
                                                                  api="management")]

    # --- management ------------------------------------------------------------------------------------
    def describe(self, model: str, version: str = "all", customized: bool = False) -> list[dict[str, Any]]:
        """TorchServe's describe; `customized` adds the handler's own (classes, threshold, intended population,
        model card) as `customizedMetadata`, decoded."""
        described = self._rest(f"/models/{model}/{version}" + ("?customized=true" if customized else ""),
                               api="management")
        for entry in described:
            if isinstance(entry.get("customizedMetadata"), str):
                try:
                    entry["customizedMetadata"] = json.loads(entry["customizedMetadata"])
                except ValueError:
                    pass
        return described

    def register(self, archive: str, model: str, initial_workers: int = 1, wait: bool = True) -> Any:
        """Register an archive of the model store (by file name); with `wait`, return once its workers are up
        (else at once: cxr.server.wait_ready can wait longer than one call's timeout)."""
        query = urllib.parse.urlencode({"url": archive, "model_name": model, "initial_workers": initial_workers,
                                        "synchronous": "true" if wait else "false"})
        return self._rest(f"/models?{query}", b"", api="management", method="POST")

    def set_default(self, model: str, version: str) -> Any:
        return self._rest(f"/models/{model}/{version}/set-default", b"", api="management", method="PUT")

    def unregister(self, model: str, version: str) -> Any:
        return self._rest(f"/models/{model}/{version}", api="management", method="DELETE")

    def scale(self, model: str, workers: int, version: str | None = None) -> Any:
        query = urllib.parse.urlencode({"min_worker": workers, "max_worker": workers, "synchronous": "true"})
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._rest(f"{path}?{query}", b"", api="management", method="PUT")

    def default_version(self, model: str) -> str:
        """The version that `/predictions/<model>` (no version) goes to."""
        return self._rest(f"/models/{model}", api="management")[0]["modelVersion"]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
