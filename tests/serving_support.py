"""A real TorchServe for the integration tests: free loopback ports, archives built from the shipped model."""

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cxr import server
from export import __main__ as export_cli
from export import archive as archive_cli
from loadtest.bench import free_ports
from tests.handler_support import write_tiny_checkpoint

# Not imported from conftest, which imports this module for its `served` fixture.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "pneumonia" / "model.pt"
SHIPPED_CXR4 = SHIPPED_MODEL.parent.parent / "cxr4" / "model.pt"


class Client:
    def __init__(self, ports: dict[str, int], keys: dict[str, str], workdir=None) -> None:
        self.ports, self.keys, self.workdir = ports, keys, workdir

    def request(self, path: str, body: bytes | None = None, content_type: str = "image/jpeg",
                key: str | None = "inference", api: str = "inference", method: str | None = None):
        headers = {"Content-Type": content_type} if body is not None else {}
        if key:
            headers["Authorization"] = f"Bearer {self.keys.get(key, key)}"
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[api]}{path}", data=body, headers=headers,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text.decode(errors="replace")

    def predict(self, data: bytes, model: str = "pneumonia", **options):
        return self.request(f"/predictions/{model}", data, **options)

    def worker_pids(self, model: str) -> list[int]:
        _, described = self.request(f"/models/{model}", key="management", api="management")
        return sorted(worker["pid"] for worker in described[0]["workers"])


@pytest.fixture(scope="session")
def served(tmp_path_factory, data_root):
    """Export the shipped models (or a tiny one when none is committed yet), archive them, start TorchServe with
    pneumonia (ONNX), pneumonia_eager and, when shipped, cxr4 (ONNX) side by side."""
    folder = tmp_path_factory.mktemp("serving")
    checkpoint = SHIPPED_MODEL if SHIPPED_MODEL.is_file() else write_tiny_checkpoint(folder / "tiny.pt")
    export_dir, store = folder / "export", folder / "model_store"
    export_cli.main(export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--data", str(data_root), "--output-dir", str(export_dir),
         "--check-images", "48", "--calibration-images", "64", "--repeats", "1"]))
    archive_cli.main(archive_cli.get_args_parser().parse_args(
        ["--export-dir", str(export_dir), "--model-store", str(store), "--default", "onnx", "--version", "1.0"]))
    archive_cli.main(archive_cli.get_args_parser().parse_args(  # a second version, for the swap test
        ["--export-dir", str(export_dir), "--model-store", str(store), "--name", "pneumonia_v2", "--variants",
         "onnx", "--default", "onnx", "--version", "2.0"]))
    models = {"pneumonia": "pneumonia.mar", "pneumonia_eager": "pneumonia_eager.mar"}
    multiclass = data_root.parent / "multiclass"
    if SHIPPED_CXR4.is_file():
        cxr4_export = folder / "export-cxr4"
        export_cli.main(export_cli.get_args_parser().parse_args(
            ["--checkpoint", str(SHIPPED_CXR4), "--data", str(multiclass), "--output-dir", str(cxr4_export),
             "--check-images", "48", "--formats", "onnx", "--repeats", "1"]))
        archive_cli.main(archive_cli.get_args_parser().parse_args(
            ["--export-dir", str(cxr4_export), "--model-store", str(store), "--name", "cxr4", "--variants", "onnx",
             "--default", "onnx", "--version", "1.0"]))
        models["cxr4"] = "cxr4.mar"
    names = ["inference", "management", "metrics", "grpc_inference", "grpc_management"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    workdir = folder / "run"
    process = server.start(workdir, models, model_store=store, ports=ports, timeout=240)
    try:
        yield Client(ports, server.read_keys(workdir), workdir)
    finally:
        server.stop_process(process)
        for port in ports.values():  # nothing listens on our ports once the server is gone
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
