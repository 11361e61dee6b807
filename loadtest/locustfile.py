"""Locust users for our TorchServe: REST (FastHttpUser, raw image bytes) and gRPC (reports each call to Locust).

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8080 RestUser
    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8080 GrpcUser \
        --grpc-port 7070

`make loadtest` wraps this (see loadtest/run.py). Images: the original-resolution X-rays of --samples (what
a client really sends). A 200 with a label is a success; anything else is a failure with its reason. Only
loopback hosts are accepted: a load test never leaves this machine.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc.experimental.gevent
from locust import FastHttpUser, User, events, task

from cxr.paths import samples_dir
from cxr.server import read_key_file

# gRPC's blocking calls would otherwise hold Locust's gevent loop: one call in flight for all users.
grpc.experimental.gevent.init_gevent()

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--model", default="pneumonia", help="model name (optionally name/version)")
    parser.add_argument("--samples", default=str(samples_dir()),
                        help="folder of X-rays to send (searched recursively)")
    parser.add_argument("--key-file", default=str(REPO / "logs" / "serve" / "key_file.json"))
    parser.add_argument("--grpc-port", type=int, default=7070)
    parser.add_argument("--think-time", type=float, default=0.0, help="seconds between a user's requests")
    parser.add_argument("--latency-log", default="", help="append 'type,ms,ok' per request to this file")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to them."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(address).is_loopback for address in addresses)


def load_samples(folder: str) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no X-rays under {folder} (pass --samples)")
    return [(p.name, p.read_bytes()) for p in paths]


def inference_key(path: str) -> str:
    return read_key_file(path)["inference"]


_state: dict[str, object] = {}


@events.test_start.add_listener
def _on_start(environment, **_) -> None:
    options = environment.parsed_options
    host = urlparse(environment.host or "").hostname or ""
    if not is_loopback(host):
        raise SystemExit(f"refusing to load-test {environment.host!r}: only 127.0.0.1 / localhost are allowed")
    _state["samples"] = load_samples(options.samples)
    _state["key"] = inference_key(options.key_file)
    _state["latency_log"] = open(options.latency_log, "a") if options.latency_log else None  # noqa: SIM115
    _state["environment"], _state["count"], _state["max"] = environment, 0, options.max_requests


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, **_) -> None:
    log = _state.get("latency_log")
    if log is not None:
        log.write(f"{request_type},{response_time:.3f},{int(exception is None)}\n")
    _state["count"] = int(_state.get("count", 0)) + 1
    environment = _state.get("environment")
    if environment is not None and _state["count"] == _state["max"] and environment.runner is not None:
        environment.runner.quit()  # the request bound: a load test never runs unbounded


@events.test_stop.add_listener
def _on_stop(environment, **_) -> None:
    log = _state.get("latency_log")
    if log is not None:
        log.close()


def check_answer(status: int, body: bytes | str) -> str | None:
    """None for a good answer, else the failure reason (status and the server's message)."""
    try:
        answer = json.loads(body)
    except (TypeError, ValueError):
        return f"{status}: not JSON"
    if status != 200:
        message = answer.get("error") or answer.get("message") if isinstance(answer, dict) else answer
        return f"{status}: {str(message)[:120]}"
    if not isinstance(answer, dict) or "label" not in answer:
        return f"{status}: answer without a label"
    return None


class RestUser(FastHttpUser):
    """POST /predictions/<model> with raw image bytes."""

    network_timeout = 60.0
    connection_timeout = 10.0

    def wait_time(self) -> float:
        return self.environment.parsed_options.think_time

    def on_start(self) -> None:
        self.path = f"/predictions/{self.environment.parsed_options.model}"
        self.headers = {"Authorization": f"Bearer {_state['key']}", "Content-Type": "image/jpeg"}

    @task
    def predict(self) -> None:
        name, data = random.choice(_state["samples"])
        with self.client.post(self.path, data=data, headers=self.headers, name=self.path,
                              catch_response=True) as response:
            reason = check_answer(response.status_code, response.content or b"")
            if reason:
                response.failure(reason)
            else:
                response.success()


class GrpcUser(User):
    """TorchServe's Predictions RPC with the key as `authorization: Bearer` metadata."""

    def wait_time(self) -> float:
        return self.environment.parsed_options.think_time

    def on_start(self) -> None:
        import grpc

        from cxr.grpc_stubs import load

        options = self.environment.parsed_options
        host = urlparse(self.environment.host).hostname
        self.channel = grpc.insecure_channel(f"{host}:{options.grpc_port}")
        stubs = load()
        self.stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(self.channel)
        self.request_type = stubs["inference_pb2"].PredictionsRequest
        model, _, version = options.model.partition("/")
        self.model, self.version = model, version
        self.metadata = (("authorization", f"Bearer {_state['key']}"),)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        import grpc

        name, data = random.choice(_state["samples"])
        request = self.request_type(model_name=self.model, model_version=self.version, input={"data": data})
        started = time.perf_counter()
        exception, length = None, 0
        try:
            reply = self.stub.Predictions(request, metadata=self.metadata, timeout=60)
            length = len(reply.prediction)
            # TorchServe returns a handler's 4xx as an OK call whose body carries "code" and "error".
            answer = json.loads(reply.prediction)
            status = int(answer.get("code", 200)) if isinstance(answer, dict) and "error" in answer else 200
            reason = check_answer(status, reply.prediction)
            if reason:
                exception = RuntimeError(reason)
        except grpc.RpcError as error:
            exception = RuntimeError(f"{error.code().name}: {(error.details() or '')[:120]}")
        except ValueError as error:
            exception = RuntimeError(f"bad answer: {error}")
        self.environment.events.request.fire(
            request_type="grpc", name=f"Predictions/{self.model}", response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={})

