"""`make bench`: the benchmark matrix, in one run on one machine with the same X-rays.

    python -m loadtest.bench --export-dir runs/export --model-store model_store --output docs/benchmarks.md

1. Model only: each backend (eager, TorchScript, ONNX Runtime, ONNX int8) on preprocessed sample X-rays at
   batch 1/4/8/16, with the server's thread setting (handlers/model-config.yaml `handler.threads`).
2. End to end: a TorchServe of its own (free loopback ports) serving each archive, then the default archive
   across batch size, max batch delay and worker count; a closed-loop load (--concurrency clients sending the
   original-resolution samples back to back) gives the maximum throughput, then open-loop loads at 50%, 80% and
   100% of it give the latency percentiles. RSS of the frontend and of each worker.
3. The naive baseline: loadtest/naive_app.py (FastAPI + uvicorn, eager, one request at a time), same loads.

Prints a table, writes the Markdown report (--output), `benchmarks.json` and plots next to it. Every load is
bounded in time and count and targets 127.0.0.1 only. The load generator runs on the same machine and counts
against the CPU it measures, as a client on the same box would.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cxr import server
from cxr.backends import load_backend
from cxr.client import Client
from cxr.preprocessing import EvalPreset, PreprocessConfig, load_image
from cxr.timing import images_per_second
from export import __main__ as export_cli
from export import archive as archive_cli

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "handlers" / "model-config.yaml"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


# --- model only -------------------------------------------------------------------------------------------
def model_only(export_dir: Path, images: list[bytes], batches: list[int], threads: int, seconds: float
               ) -> dict[str, dict[int, float]]:
    """Images/s of each backend at each batch size: median over repeats of one predict() call."""
    results: dict[str, dict[int, float]] = {}
    for name, file_name in tqdm(export_cli.FILE_NAMES.items(), desc="model only"):
        path = export_dir / file_name
        if not path.is_file():
            continue
        backend = load_backend(path, "cpu", threads=threads)
        preset = EvalPreset(PreprocessConfig.from_dict(backend.config["preprocessing"]))
        tensors = torch.stack([preset(load_image(data, preset.decode_size)) for data in images])
        results[name] = {}
        for batch_size in batches:
            batch = tensors[:batch_size] if batch_size <= len(tensors) else tensors.repeat(
                (batch_size + len(tensors) - 1) // len(tensors), 1, 1, 1)[:batch_size]
            results[name][batch_size] = images_per_second(backend.predict, batch, batch_size, repeats=5, warmup=3,
                                                          min_seconds=seconds)
    return results


def profile_stages(export_dir: Path, variant_file: str, gate_path: Path | None, images: list[bytes], threads: int,
                   spin: bool = True) -> dict[str, float]:
    """Median ms per stage of one request inside the handler, on each sample: decode, resize + normalise, gate,
    inference (batch 1), JSON. What TorchServe adds (HTTP, frontend, queue, IPC) is the end-to-end latency at
    concurrency 1 minus their sum."""
    from cxr.gate import OodGate

    backend = load_backend(export_dir / variant_file, "cpu", threads=threads, spin=spin)
    config = PreprocessConfig.from_dict(backend.config["preprocessing"])
    preset = EvalPreset(config)
    gate = OodGate.load(gate_path) if gate_path else None
    stages: dict[str, list[float]] = {"decode": [], "resize_normalise": [], "gate": [], "inference": [], "json": []}
    for _ in range(3):
        for data in images:
            marks = [time.perf_counter()]
            image = load_image(data, preset.decode_size)
            marks.append(time.perf_counter())
            batch = preset(image)[None]
            marks.append(time.perf_counter())
            if gate is not None:
                gate.scores(batch, config.mean[0], config.std[0])
            marks.append(time.perf_counter())
            probabilities = backend.predict(batch)
            marks.append(time.perf_counter())
            json.dumps({"probabilities": {str(k): float(p) for k, p in enumerate(probabilities[0])}})
            marks.append(time.perf_counter())
            for key, (start, end) in zip(stages, itertools.pairwise(marks), strict=True):
                stages[key].append((end - start) * 1000)
    return {key: float(np.median(values)) for key, values in stages.items()}


# --- load generation --------------------------------------------------------------------------------------
class Target:
    """Where the load goes: loopback host, port, path and headers."""

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port, self.path, self.headers = "127.0.0.1", port, path, headers

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def send(self, connection: http.client.HTTPConnection, body: bytes
             ) -> tuple[int, bool, http.client.HTTPConnection]:
        """(HTTP status or 0 for a connection error, success = a 200 with a label, the connection to reuse)."""
        try:
            connection.request("POST", self.path, body=body, headers=self.headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.status == 200 and b'"label"' in data, connection
        except (OSError, http.client.HTTPException):
            connection.close()
            return 0, False, self.connection()


def closed_loop(target: Target, payloads: list[bytes], concurrency: int, seconds: float,
                max_requests: int = 100_000) -> dict[str, Any]:
    """`concurrency` clients, each sending the next request when its answer arrives: the maximum throughput."""
    records: list[tuple[float, bool, int]] = []
    lock, stop_at = threading.Lock(), time.perf_counter() + seconds

    def client(offset: int) -> None:
        connection, index = target.connection(), offset
        while time.perf_counter() < stop_at:
            with lock:
                if len(records) >= max_requests:
                    break
            started = time.perf_counter()
            status, ok, connection = target.send(connection, payloads[index % len(payloads)])
            index += 1
            with lock:
                records.append((time.perf_counter() - started, ok, status))
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k * 7,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _summary(records, time.perf_counter() - started)


def open_loop(target: Target, payloads: list[bytes], rate: float, seconds: float, pool_size: int = 48
              ) -> dict[str, Any]:
    """Requests issued at a fixed rate whatever the server does; latency counts from the scheduled send time,
    so a server that falls behind shows it (no coordinated omission)."""
    local = threading.local()
    records: list[tuple[float, bool, int]] = []
    lock = threading.Lock()

    def send(scheduled: float, body: bytes) -> None:
        if not hasattr(local, "connection"):
            local.connection = target.connection()
        status, ok, local.connection = target.send(local.connection, body)
        with lock:
            records.append((time.perf_counter() - scheduled, ok, status))

    count = int(rate * seconds)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=pool_size) as pool:
        for index in range(count):
            scheduled = started + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, scheduled, payloads[index % len(payloads)])
    return {**_summary(records, time.perf_counter() - started), "offered_rate": rate}


def _summary(records: list[tuple[float, bool, int]], elapsed: float) -> dict[str, Any]:
    latencies = np.array([r[0] for r in records]) * 1000
    ok = np.array([r[1] for r in records], dtype=bool)
    good = latencies[ok] if ok.any() else np.array([np.nan])
    p50, p95, p99 = np.percentile(good, [50, 95, 99])
    statuses: dict[str, int] = {}
    for record in records:
        statuses[str(record[2])] = statuses.get(str(record[2]), 0) + 1
    failed = latencies[~ok]
    return {"requests": int(len(records)), "failures": int((~ok).sum()), "seconds": elapsed,
            "throughput": float(ok.sum() / elapsed), "p50_ms": float(p50), "p95_ms": float(p95),
            "p99_ms": float(p99), "statuses": statuses,
            "failed_p50_ms": float(np.median(failed)) if len(failed) else None}


def rss_mb(pids: list[int]) -> list[float]:
    import psutil

    values = []
    for pid in pids:
        try:
            values.append(psutil.Process(pid).memory_info().rss / 2**20)
        except psutil.Error:
            values.append(float("nan"))
    return values


# --- TorchServe -------------------------------------------------------------------------------------------
class BenchServer:
    """A TorchServe of our own on free loopback ports, with archives registered one configuration at a time."""

    def __init__(self, workdir: Path, model_store: Path) -> None:
        names = ["inference", "management", "metrics", "grpc_inference", "grpc_management"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.model_store = model_store
        self.process = server.start(workdir, {}, model_store=model_store, ports=self.ports, timeout=240)
        self.keys = server.read_keys(workdir.resolve())
        self.client = Client(self.keys, ports=self.ports, timeout=300)

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


def build_variant(export_dir: Path, store: Path, staged: Path, variant: str, batch_size: int, delay: int,
                  workers: int, threads: int, handler: dict[str, Any] | None = None) -> str:
    """An archive of `variant` whose model-config.yaml carries this batching/worker configuration."""
    config = yaml.safe_load(BASE_CONFIG.read_text())
    config.update(batchSize=batch_size, maxBatchDelay=delay, minWorkers=workers, maxWorkers=workers)
    config["handler"] = {**config.get("handler", {}), **(handler or {}), "threads": threads}
    name = f"bench_{variant}_b{batch_size}_d{delay}_w{workers}_t{threads}"
    config_file = staged.parent / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    archive_cli.build_archive(export_dir / archive_cli.VARIANTS[variant], name, "1.0", store, staged, config_file)
    return name


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


# --- naive baseline ---------------------------------------------------------------------------------------
def run_naive(checkpoint: Path, payloads: list[bytes], concurrency: int, seconds: float, threads: int,
              workdir: Path) -> dict[str, Any]:
    [port] = free_ports(1)
    environment = {**os.environ, "CXR_CHECKPOINT": str(checkpoint.resolve()), "CXR_THREADS": str(threads)}
    with open(workdir / "naive.out", "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "loadtest.naive_app:app", "--host", "127.0.0.1",
                                    "--port", str(port), "--log-level", "warning", "--no-access-log"],
                                   cwd=REPO, env=environment, stdout=output, stderr=subprocess.STDOUT)
    try:
        target = Target(port, "/predict", {"Content-Type": "image/jpeg"})
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"naive app exited; see {workdir / 'naive.out'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("naive app did not start") from None
                time.sleep(0.3)
        closed_loop(target, payloads, concurrency, min(3.0, seconds))
        result = {"max": closed_loop(target, payloads, concurrency, seconds),
                  "rss_mb": {"app": rss_mb([process.pid])[0]}}
        peak = result["max"]["throughput"]
        result["load"] = {f"{share}%": open_loop(target, payloads, peak * share / 100, seconds)
                          for share in (50, 80, 100)}
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- report -----------------------------------------------------------------------------------------------
def plot(results: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    figure, axes = plt.subplots(figsize=(6.4, 4))
    for backend, values in results["model_only"].items():
        axes.plot(list(values), list(values.values()), marker="o", label=f"{backend} (model only)")
    served_rest = results["default_config"].split("_d", 1)[1]  # delay, workers, threads of the shipped config
    batch_rows = {int(k.split("_b")[1].split("_")[0]): v["max"]["throughput"] for k, v in results["e2e"].items()
                  if k.startswith(f"bench_{results['default_variant']}_") and k.endswith(f"_d{served_rest}")}
    if batch_rows:
        keys = sorted(batch_rows)
        axes.plot(keys, [batch_rows[k] for k in keys], marker="s", color="black",
                  label=f"{results['default_variant']} end to end (TorchServe)")
    axes.axhline(results["naive"]["max"]["throughput"], color="red", linestyle=":", label="naive FastAPI")
    axes.set(xlabel="batch size", ylabel="X-rays / s", title="Throughput vs batch size (2-core CPU)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "bench_throughput.png", dpi=110)
    plt.close(figure)
    names.append("bench_throughput.png")

    figure, axes = plt.subplots(figsize=(6.4, 4))
    for label, block, style in (("ours", results["e2e"][results["default_config"]], "-"),
                                ("naive", results["naive"], "--")):
        shares = list(block["load"])
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            axes.plot(shares, [block["load"][s][key] for s in shares], marker="o", linestyle=style,
                      label=f"{label} {key[:3]}")
    axes.set(xlabel="offered load (share of each server's max throughput)", ylabel="latency (ms)",
             title="Latency percentiles vs load", yscale="log")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(folder / "bench_latency.png", dpi=110)
    plt.close(figure)
    names.append("bench_latency.png")
    return names


def ratios(results: dict[str, Any]) -> dict[str, float]:
    default = results["e2e"][results["default_config"]]
    backend = archive_cli.REPORT_NAMES[results["default_variant"]]
    served_batch = results["served_batch"]
    model_limit = results["model_only"][backend][served_batch]
    at80 = default["load"]["80%"]
    return {"e2e_over_model_only": default["max"]["throughput"] / model_limit,
            "ours_over_naive": default["max"]["throughput"] / results["naive"]["max"]["throughput"],
            "p99_over_p50_at_80": at80["p99_ms"] / at80["p50_ms"],
            "failures": sum(block["max"]["failures"] + sum(v["failures"] for v in block.get("load", {}).values())
                            for block in [*results["e2e"].values(), results["naive"]])}


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    r = ratios(results)
    default = results["e2e"][results["default_config"]]
    lines = ["# Benchmarks", "",
             f"Written by `make bench` on {results['machine']} ({results['date']}); the load generator runs on the "
             f"same machine. Images: the {results['images']} original-resolution X-rays of `../shared/data/samples/`. "
             f"Closed loop: {results['concurrency']} clients back to back for {results['seconds']:.0f} s; open loop: "
             "fixed rates at 50/80/100% of that maximum.", "",
             "## Against the goals", "", "| goal | measured | |", "|---|---|---|",
             f"| end to end >= 0.8x model-only ({results['default_variant']}, batch {results['served_batch']}) | "
             f"**{r['e2e_over_model_only']:.2f}x** | {'met' if r['e2e_over_model_only'] >= 0.8 else 'not met'} |",
             f"| >= 2x the naive FastAPI baseline | **{r['ours_over_naive']:.2f}x** | "
             f"{'met' if r['ours_over_naive'] >= 2 else 'not met'} |",
             f"| p99 <= 2x p50 at 80% of max load | **{r['p99_over_p50_at_80']:.2f}x** | "
             f"{'met' if r['p99_over_p50_at_80'] <= 2 else 'not met'} |",
             f"| no failures | {r['failures']} | {'met' if r['failures'] == 0 else 'not met'} |", "",
             f"## Model only (images/s, {results['model_threads']} threads: the cores the server's workers use "
             "together)", "",
             "| backend | " + " | ".join(f"batch {b}" for b in results["batches"]) + " |",
             "|---|" + "---|" * len(results["batches"])]
    for backend, values in results["model_only"].items():
        lines.append(f"| {backend} | " + " | ".join(f"{values[b]:.1f}" for b in results["batches"]) + " |")
    lines += ["", "## End to end through TorchServe (closed loop: maximum throughput)", "",
              "| archive, batch size, max delay (ms), workers x threads | X-rays/s | p50 ms | p95 ms | p99 ms | "
              "failures | RSS frontend / workers (MB) | vs model only |", "|---|---|---|---|---|---|---|---|"]
    for name, block in results["e2e"].items():
        variant, batch = name.split("_")[1], int(name.split("_b")[1].split("_")[0])
        backend = archive_cli.REPORT_NAMES[variant]
        limit = results["model_only"].get(backend, {}).get(batch)
        m = block["max"]
        workers = " + ".join(f"{x:.0f}" for x in block["rss_mb"]["workers"])
        label = name.removeprefix("bench_").replace("_", " ")
        lines.append(f"| {label}{' **(shipped)**' if name == results['default_config'] else ''} | "
                     f"{m['throughput']:.1f} | {m['p50_ms']:.0f} | {m['p95_ms']:.0f} | {m['p99_ms']:.0f} | "
                     f"{m['failures']}/{m['requests']} | {block['rss_mb']['frontend']:.0f} / {workers} | "
                     f"{(m['throughput'] / limit) if limit else float('nan'):.2f}x |")
    naive = results["naive"]
    lines += [f"| naive FastAPI + uvicorn, eager, one at a time | {naive['max']['throughput']:.1f} | "
              f"{naive['max']['p50_ms']:.0f} | {naive['max']['p95_ms']:.0f} | {naive['max']['p99_ms']:.0f} | "
              f"{naive['max']['failures']}/{naive['max']['requests']} | {naive['rss_mb']['app']:.0f} (one process) | |",
              "", "## Latency under load (open loop)", "",
              "| server | offered | achieved X-rays/s | p50 ms | p95 ms | p99 ms | p99/p50 | failures |",
              "|---|---|---|---|---|---|---|---|"]
    for label, block in (("ours (shipped config)", default), ("naive", naive)):
        for share, v in block["load"].items():
            lines.append(f"| {label} | {share} ({v['offered_rate']:.1f}/s) | {v['throughput']:.1f} | "
                         f"{v['p50_ms']:.0f} | {v['p95_ms']:.0f} | {v['p99_ms']:.0f} | "
                         f"{v['p99_ms'] / v['p50_ms']:.2f} | {v['failures']}/{v['requests']} |")
    profile, single = results["profile"], results["single"]
    handler_ms = sum(profile.values())
    lines += ["", "## One request, end to end (median ms, default archive, one client)", "",
              "| stage | ms | share |", "|---|---|---|"]
    for key, value in profile.items():
        lines.append(f"| handler: {key.replace('_', ' ')} | {value:.2f} | {value / single['p50_ms']:.0%} |")
    rest = single["p50_ms"] - handler_ms
    lines += [f"| TorchServe: HTTP, frontend, queue, IPC to the worker (end to end minus the handler) | {rest:.2f} | "
              f"{rest / single['p50_ms']:.0%} |",
              f"| **end to end at concurrency 1** (p50; {single['throughput']:.1f} X-rays/s) | "
              f"**{single['p50_ms']:.2f}** | |"]
    lines += [""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def write_reports(results: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(results, output.parent)
    (output.parent / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    output.write_text(markdown(results, plots))


def main(args: argparse.Namespace) -> dict[str, Any]:
    export_dir, output = Path(args.export_dir), Path(args.output)
    if args.report_only:  # redraw the report and plots from a previous run's benchmarks.json
        results = json.loads((output.parent / "benchmarks.json").read_text())
        results["model_only"] = {name: {int(batch): value for batch, value in values.items()}  # JSON keys are text
                                 for name, values in results["model_only"].items()}
        write_reports(results, output)
        print(json.dumps(ratios(results), indent=2))
        return results
    samples = sorted(p for p in Path(args.samples).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not samples:
        raise SystemExit(f"no sample X-rays under {args.samples}")
    payloads = [p.read_bytes() for p in samples]
    base = yaml.safe_load(BASE_CONFIG.read_text())
    threads, served_batch, served_delay = base["handler"]["threads"], base["batchSize"], base["maxBatchDelay"]
    served_workers = base["minWorkers"]
    default_variant = args.default_variant or archive_cli.fastest_exact_variant(export_dir)
    handler_settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.handler)}
    results: dict[str, Any] = {
        "machine": args.machine or f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"),
        "images": len(payloads), "concurrency": args.concurrency, "seconds": args.seconds, "batches": args.batches,
        "served_batch": served_batch, "default_variant": default_variant}
    # The model's own limit on the cores the server's workers use together (workers x threads per worker).
    model_threads = served_workers * threads
    results["model_threads"] = model_threads
    results["model_only"] = model_only(export_dir, payloads[:16], args.batches, model_threads, args.model_seconds)
    results["profile"] = profile_stages(export_dir, archive_cli.VARIANTS[default_variant],
                                        Path(args.gate) if args.gate else None, payloads, threads,
                                        spin=bool((base["handler"] | handler_settings).get("onnx_spin", True)))

    configs = [(variant, served_batch, served_delay, served_workers, threads) for variant in args.variants]
    configs += [(default_variant, b, served_delay, served_workers, threads) for b in args.batches if b != served_batch]
    configs += [(default_variant, served_batch, d, served_workers, threads) for d in args.delays if d != served_delay]
    configs += [(default_variant, served_batch, served_delay, w, max(1, model_threads // w)) for w in args.workers
                if w != served_workers]
    if args.only:  # explicit configurations instead of the matrix: variant,batch,delay,workers,threads
        configs = [(v, int(b), int(d), int(w), int(t)) for v, b, d, w, t in (item.split(",") for item in args.only)]
        configs.insert(0, (default_variant, served_batch, served_delay, served_workers, threads))
    results["default_config"] = (f"bench_{default_variant}_b{served_batch}_d{served_delay}_w{served_workers}"
                                 f"_t{threads}")
    results["e2e"] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        store.mkdir()
        staged = archive_cli.stage_serving_code(scratch / "extra", Path(args.gate) if args.gate else None)
        bench = BenchServer(scratch / "serve", store)
        try:
            for config in tqdm(configs, desc="end to end"):
                name = build_variant(export_dir, store, staged, *config, handler=handler_settings)
                sweep = name == results["default_config"]
                results["e2e"][name] = run_config(bench, name, payloads, args.concurrency, args.seconds, sweep)
                if sweep:
                    results["single"] = results["e2e"][name].pop("single")
                m = results["e2e"][name]["max"]
                tqdm.write(f"{name}: {m['throughput']:.1f}/s p50 {m['p50_ms']:.0f} p99 {m['p99_ms']:.0f} ms, "
                           f"failures {m['failures']}")
        finally:
            bench.close()
        results["naive"] = run_naive(Path(args.checkpoint), payloads, args.concurrency, args.seconds, threads, scratch)
    write_reports(results, output)
    print(json.dumps(ratios(results), indent=2))
    print(f"report: {output}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", default="runs/export")
    parser.add_argument("--model-store", default="model_store", help="(unused: bench archives go to a temp store)")
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt", help="for the naive baseline")
    parser.add_argument("--gate", default=str(archive_cli.DEFAULT_GATE))
    parser.add_argument("--samples", default=str(REPO.parent / "shared" / "data" / "samples"))
    parser.add_argument("--output", default="docs/benchmarks.md")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--delays", type=int, nargs="+", default=[2, 5, 10, 25])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=["eager", "ts", "onnx", "int8"])
    parser.add_argument("--default-variant", default=None, help="default: the one make archive ships")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="per load")
    parser.add_argument("--model-seconds", type=float, default=2.0, help="per model-only cell")
    parser.add_argument("--machine", default=None, help="how to name the machine in the report")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from benchmarks.json")
    parser.add_argument("--only", nargs="*", default=[], metavar="VARIANT,BATCH,DELAY,WORKERS,THREADS",
                        help="run these configurations (plus the shipped one) instead of the matrix")
    parser.add_argument("--handler", nargs="*", default=[], metavar="KEY=VALUE",
                        help="handler settings to try on top of handlers/model-config.yaml (e.g. onnx_spin=false)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
