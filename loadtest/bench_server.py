"""The servers a benchmark measures: a TorchServe of our own on free loopback ports (one archive per
`BenchConfig`), and the naive FastAPI baseline (loadtest/naive_app.py)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cxr import server
from cxr.client import Client
from cxr.paths import SHIPPED_GATE, samples_dir
from cxr.server import free_ports
from cxr_core.variants import VARIANTS
from export import archive as archive_cli
from export.archive import DEFAULT_MODEL_CONFIG
from loadtest.load import Target, closed_loop, open_loop, rss_mb

REPO = Path(__file__).resolve().parent.parent


class BenchServer:
    """A TorchServe of our own on free loopback ports, with archives registered one configuration at a time."""

    def __init__(self, workdir: Path, model_store: Path) -> None:
        names = ["inference", "management", "metrics", "grpc_inference", "grpc_management"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.model_store = model_store
        self.process = server.start(workdir, {}, model_store=model_store, ports=self.ports, timeout=600)
        self.keys = server.read_keys(workdir.resolve())
        self.client = Client(self.keys, ports=self.ports, timeout=900)  # a slow machine's worker start

    def register(self, name: str) -> int:
        """Register `<name>.mar` and wait for as many workers as its model-config.yaml asks for (registration
        itself starts one); returns that worker count."""
        self.client.register(f"{name}.mar", name, initial_workers=1)
        described = self.client.describe(name)[0]
        if len(described.get("workers", [])) < described["minWorkers"]:
            self.client.scale(name, described["minWorkers"])
        return described["minWorkers"]

    def target(self, model: str) -> Target:
        return Target(self.ports["inference"], f"/predictions/{model}",
                      {"Authorization": f"Bearer {self.keys['inference']}", "Content-Type": "image/jpeg"})

    def frontend_pid(self) -> int:
        import psutil

        children = psutil.Process(self.process.pid).children(recursive=True)
        java = [child.pid for child in children if "java" in child.name()]
        return java[0] if java else self.process.pid

    def close(self) -> None:
        server.stop_process(self.process)


@dataclass(frozen=True)
class BenchConfig:
    """One served configuration: which variant, and the batching and worker settings of its archive."""
    variant: str
    batch_size: int
    delay_ms: int
    workers: int
    threads: int

    @property
    def name(self) -> str:
        """The archive (and model) name, e.g. `bench_onnx_b8_d10_w2_t1`."""
        return f"bench_{self.variant}_b{self.batch_size}_d{self.delay_ms}_w{self.workers}_t{self.threads}"

    @property
    def label(self) -> str:
        return f"{self.variant} b{self.batch_size} d{self.delay_ms} w{self.workers} t{self.threads}"


def build_config_archive(export_dir: Path, store: Path, staged: Path, config: BenchConfig,
                         handler: dict[str, Any] | None = None) -> str:
    """An archive of `config.variant` whose model-config.yaml carries this batching/worker configuration. The
    population check runs with `warn` (same cost as `refuse`) so every sample X-ray is answered with a 200."""
    settings = yaml.safe_load(DEFAULT_MODEL_CONFIG.read_text())
    settings.update(batchSize=config.batch_size, maxBatchDelay=config.delay_ms, minWorkers=config.workers,
                    maxWorkers=config.workers)
    settings["handler"] = {**settings.get("handler", {}), "population_check": "warn", **(handler or {}),
                           "threads": config.threads}
    config_file = staged.parent / f"{config.name}.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    archive_cli.build_archive(export_dir / VARIANTS[config.variant].file_name, config.name, "1.0", store, staged,
                              config_file)
    return config.name


def run_config(bench: BenchServer, name: str, payloads: list[bytes], concurrency: int, seconds: float,
               sweep: bool) -> dict[str, Any]:
    bench.register(name)
    try:
        target = bench.target(name)
        closed_loop(target, payloads, concurrency, min(3.0, seconds))  # warm-up
        result = {"max": closed_loop(target, payloads, concurrency, seconds)}
        workers = [w["pid"] for w in bench.client.describe(name)[0]["workers"]]
        result["rss_mb"] = {"frontend": rss_mb([bench.frontend_pid()])[0], "workers": rss_mb(workers)}
        if sweep:
            peak = result["max"]["throughput"]
            result["load"] = {f"{share}%": open_loop(target, payloads, peak * share / 100, seconds)
                              for share in (50, 80, 100)}
            result["single"] = closed_loop(target, payloads, 1, seconds)  # a lone request, for the profile
        return result
    finally:
        bench.client.unregister(name, "1.0")


def run_app(command: list[str], environment: dict[str, str], target: Target, payloads: list[bytes],
            concurrency: int, seconds: float, log: Path) -> dict[str, Any]:
    """A baseline server of our own making (`command` on a free port, `target`): the same loads as ours, and
    the memory of its whole process tree."""
    import psutil

    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **environment}, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[2]} exited; see {log}")
            try:
                with socket.create_connection(("127.0.0.1", target.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command[2]} did not start; see {log}") from None
                time.sleep(0.3)
        closed_loop(target, payloads, concurrency, min(3.0, seconds))
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        result = {"max": closed_loop(target, payloads, concurrency, seconds), "rss_mb": {"app": sum(rss_mb(tree))}}
        peak = result["max"]["throughput"]
        result["load"] = {f"{share}%": open_loop(target, payloads, peak * share / 100, seconds)
                          for share in (50, 80, 100)}
        return result
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def run_naive(checkpoint: Path, payloads: list[bytes], concurrency: int, seconds: float, threads: int,
              workdir: Path) -> dict[str, Any]:
    """loadtest/naive_app.py: FastAPI + uvicorn, eager PyTorch, one request at a time."""
    [port] = free_ports(1)
    command = [sys.executable, "-m", "uvicorn", "loadtest.naive_app:app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", "--no-access-log"]
    environment = {"CXR_CHECKPOINT": str(checkpoint.resolve()), "CXR_THREADS": str(threads)}
    return run_app(command, environment, Target(port, "/predict", {"Content-Type": "image/jpeg"}), payloads,
                   concurrency, seconds, workdir / "naive.out")


def run_litserve(onnx: Path, payloads: list[bytes], concurrency: int, seconds: float, threads: int,
                 workdir: Path) -> dict[str, Any]:
    """loadtest/litserve_app.py: LitServe + ONNX Runtime around the same ONNX file, dynamic batching, base64
    JSON bodies (what LitServe reads)."""
    [port] = free_ports(1)
    command = [sys.executable, "-m", "loadtest.litserve_app", "--port", str(port)]
    environment = {"CXR_ONNX": str(onnx.resolve()), "CXR_THREADS": str(threads)}
    bodies = [json.dumps({"image": base64.b64encode(payload).decode()}).encode() for payload in payloads]
    return run_app(command, environment, Target(port, "/predict", {"Content-Type": "application/json"}), bodies,
                   concurrency, seconds, workdir / "litserve.out")


def add_server_arguments(parser: argparse.ArgumentParser, output: str) -> argparse.ArgumentParser:
    """What `make bench` and `make drills` share: the export to archive, the gate, the X-rays to send, the
    clients, the report and how to name the machine in it."""
    parser.add_argument("--export-dir", default="runs/export-pneumonia", help="output of `python -m export`")
    parser.add_argument("--gate", default=str(SHIPPED_GATE))
    parser.add_argument("--samples", default=str(samples_dir()), help="folder of X-rays to send (searched deep)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--output", default=output)
    parser.add_argument("--machine", default=None, help="how to name the machine in the report")
    return parser


def read_payloads(samples: str | Path) -> list[bytes]:
    """The bytes of every JPEG/PNG under `samples`, in a stable order."""
    paths = sorted(p for p in Path(samples).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not paths:
        raise SystemExit(f"no sample X-rays under {samples}")
    return [path.read_bytes() for path in paths]
