"""A real TorchServe for the integration tests: free loopback ports, archives built from the shipped model."""

import json
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cxr import cli, server
from cxr.client import Client as CxrClient
from cxr.paths import data_root
from cxr.server import free_ports
from cxr_core.variants import VARIANTS
from export import __main__ as export_cli
from export import archive as archive_cli
from tests.handler_support import write_tiny_checkpoint

# Not imported from conftest, which imports this module for its `served` fixture.
REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "models" / "pneumonia" / "model.pt"
SHIPPED_CXR4 = REPO / "models" / "cxr4" / "model.pt"
MODEL_CONFIG = REPO / "handlers" / "model-config.yaml"


class Client:
    def __init__(self, ports: dict[str, int], keys: dict[str, str], workdir=None, store=None, export_dir=None
                 ) -> None:
        self.ports, self.keys, self.workdir, self.store, self.export_dir = ports, keys, workdir, store, export_dir

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


def slow_machine_config(path: Path, workers: int = 1) -> Path:
    """The shipped model-config.yaml with `workers` workers and a startup timeout for slow machines: the
    integration tests run on a 2-core CI machine, where importing torch alone can take minutes when the machine
    is shared."""
    config = yaml.safe_load(MODEL_CONFIG.read_text())
    config.update(minWorkers=workers, maxWorkers=workers, startupTimeout=900)
    path.write_text(yaml.safe_dump(config))
    return path


def archive(export_dir: Path, store: Path, config: Path, *options: str) -> None:
    archive_cli.main(archive_cli.get_args_parser().parse_args(
        ["--export-dir", str(export_dir), "--model-store", str(store), "--model-config", str(config), *options]))


def register(ports: dict[str, int], keys: dict[str, str], name: str, archive_name: str) -> None:
    """Register an archive from the store with one worker, without waiting for it (wait_ready does)."""
    client = CxrClient(keys, ports=ports, timeout=60, retries=0)
    try:
        client.register(archive_name, name, wait=False)
    finally:
        client.close()


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """TorchServe with pneumonia (the shipped model exported to ONNX, as `make serve` ships it), pneumonia_eager
    and, when shipped, cxr4 (eager) side by side, one worker each; pneumonia-2.0.mar waits in the store for the
    swap test. One export (ONNX, checked on a few images) keeps the fixture affordable on 2 cores: TorchScript
    and int8 are checked in test_export and test_handler. Without the data root the export is checked on the
    example X-rays."""
    data = data_root()
    folder = tmp_path_factory.mktemp("serving")
    checkpoint = SHIPPED_MODEL if SHIPPED_MODEL.is_file() else write_tiny_checkpoint(folder / "tiny.pt")
    export_dir, store = folder / "export", folder / "model_store"
    config = slow_machine_config(folder / "model-config.yaml")
    export_cli.main(export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--data", str(data / "pneumonia"), "--output-dir", str(export_dir),
         "--formats", "onnx", "--check-images", "16", "--repeats", "1"]))
    archive(export_dir, store, config, "--variants", "eager", "--default", "onnx", "--version", "1.0")
    archive(export_dir, store, config, "--variants", "--default", "onnx", "--version", "2.0")  # for the swap test
    models = {"pneumonia": "pneumonia.mar", "pneumonia_eager": "pneumonia_eager.mar"}
    if SHIPPED_CXR4.is_file():
        cxr4_dir = folder / "cxr4"
        cxr4_dir.mkdir()
        shutil.copy2(SHIPPED_CXR4, cxr4_dir / VARIANTS["eager"].file_name)
        archive(cxr4_dir, store, config, "--name", "cxr4", "--variants", "--default", "eager", "--version", "1.0")
        models["cxr4"] = "cxr4.mar"
    names = ["inference", "management", "metrics", "grpc_inference", "grpc_management"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    workdir = folder / "run"
    # One model at start, the others registered one after another: each worker imports torch before TorchServe's
    # fixed 2-minute start-up wait ends, and on a loaded 2-core machine that fails when several do it at once.
    first, *others = models
    process = server.start(workdir, {first: models[first]}, model_store=store, ports=ports, timeout=1200)
    try:
        for name in others:
            register(ports, server.read_keys(workdir), name, models[name])
            server.wait_ready(workdir, ports["management"], [name], process, timeout=1200)
        yield Client(ports, server.read_keys(workdir), workdir, store, export_dir)
    finally:
        server.stop_process(process)
        for port in ports.values():  # nothing listens on our ports once the server is gone
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


def run_cli(served, capsys, *arguments: str) -> tuple[int, list[dict]]:
    """`cxr ARGUMENTS` against the served TorchServe: its exit code and the JSON lines it printed."""
    options = ["--key-file", str(served.workdir / "key_file.json"), "--port", str(served.ports["inference"]),
               "--grpc-port", str(served.ports["grpc_inference"]),
               "--management-port", str(served.ports["management"])]
    code = cli.main([*options, *arguments])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


class StillRunning:
    """A process that never ends, for server.wait_ready when the TorchServe it waits for is not its child."""

    returncode = None

    def poll(self):
        return None
