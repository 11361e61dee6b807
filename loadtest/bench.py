"""`make bench` (the shipped configuration) and `make bench-matrix` (`--matrix`: every variant, batch size, delay
and worker split beside it), in one run on one machine with the same X-rays.

    python -m loadtest.bench --export-dir runs/export-pneumonia --output runs/reports/benchmarks.md

1. Model only: each backend (eager, TorchScript, ONNX Runtime, ONNX int8, AOTInductor) on preprocessed sample
   X-rays at batch 1/4/8/16, with the server's thread setting (handlers/model-config.yaml `handler.threads`).
2. End to end: a TorchServe of its own (free loopback ports) serving the shipped configuration (with
   `--matrix` also each archive, then the default archive across batch size, max batch delay and worker
   count); a closed-loop load (--concurrency clients sending the
   original-resolution samples back to back) gives the maximum throughput, then open-loop loads at 50%, 80% and
   100% of it give the latency percentiles. RSS of the frontend and of each worker.
3. The naive baseline: loadtest/naive_app.py (FastAPI + uvicorn, eager, one request at a time), and a
   hand-rolled LitServe server around the default archive's ONNX file (loadtest/litserve_app.py), same loads.

Prints a table, writes the Markdown report (--output), `benchmarks.json` and plots next to it. Every load is
bounded in time and count and targets 127.0.0.1 only. The load generator runs on the same machine and counts
against the CPU it measures, as a client on the same box would.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.timing import images_per_second
from cxr_core.backends import load_backend
from cxr_core.preprocessing import EvalPreset
from cxr_core.settings import HandlerSettings
from cxr_core.variants import VARIANTS
from export import archive as archive_cli
from export.archive import DEFAULT_MODEL_CONFIG
from loadtest.bench_report import ratios, write_reports
from loadtest.bench_server import (
    BenchConfig,
    BenchServer,
    add_server_arguments,
    build_config_archive,
    read_payloads,
    run_config,
    run_litserve,
    run_naive,
)


# --- model only -------------------------------------------------------------------------------------------
def model_only(export_dir: Path, images: list[bytes], batches: list[int], threads: int, seconds: float
               ) -> dict[str, dict[int, float]]:
    """Images/s of each backend at each batch size: median over repeats of one predict() call."""
    results: dict[str, dict[int, float]] = {}
    for name, variant in tqdm(VARIANTS.items(), desc="model only"):
        path = export_dir / variant.file_name
        if not path.is_file():
            continue
        backend = load_backend(path, "cpu", threads=threads)
        preset = EvalPreset(backend.config.preprocessing)
        tensors = torch.stack([preset.load(data) for data in images])
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
    from cxr_core.gate import OodGate

    backend = load_backend(export_dir / variant_file, "cpu", threads=threads, spin=spin)
    config = backend.config.preprocessing
    preset = EvalPreset(config)
    gate = OodGate.load(gate_path) if gate_path else None
    stages: dict[str, list[float]] = {"decode": [], "resize_normalise": [], "gate": [], "inference": [], "json": []}
    for _ in range(3):
        for data in images:
            marks = [time.perf_counter()]
            image = preset.decode(data)
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


def main(args: argparse.Namespace) -> dict[str, Any]:
    export_dir, output = Path(args.export_dir), Path(args.output)
    if args.report_only:  # redraw the report and plots from a previous run's benchmarks.json
        results = json.loads(output.with_suffix(".json").read_text())
        results["model_only"] = {name: {int(batch): value for batch, value in values.items()}  # JSON keys are text
                                 for name, values in results["model_only"].items()}
        write_reports(results, output)
        print(json.dumps(ratios(results), indent=2))
        return results
    payloads = read_payloads(args.samples)
    base = yaml.safe_load(DEFAULT_MODEL_CONFIG.read_text())
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
    results["profile"] = profile_stages(export_dir, VARIANTS[default_variant].file_name,
                                        Path(args.gate) if args.gate else None, payloads, threads,
                                        spin=HandlerSettings.from_yaml(base["handler"] | handler_settings).onnx_spin)

    shipped = BenchConfig(default_variant, served_batch, served_delay, served_workers, threads)
    configs = [shipped] + [BenchConfig(v, int(b), int(d), int(w), int(t))  # variant,batch,delay,workers,threads
                           for v, b, d, w, t in (item.split(",") for item in args.only)]
    if args.matrix:  # every variant, batch size, delay and worker split, each varied alone from the shipped one
        configs += [replace(shipped, variant=variant) for variant in args.variants]
        configs += [replace(shipped, batch_size=b) for b in args.batches if b != served_batch]
        configs += [replace(shipped, delay_ms=d) for d in args.delays if d != served_delay]
        configs += [replace(shipped, workers=w, threads=max(1, model_threads // w)) for w in args.workers
                    if w != served_workers]
    results["matrix"] = args.matrix
    results["default_config"] = shipped.name
    results["e2e"] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        store.mkdir()
        staged = archive_cli.stage_serving_code(scratch / "extra", Path(args.gate) if args.gate else None)
        bench = BenchServer(scratch / "serve", store)
        try:
            for config in tqdm(list(dict.fromkeys(configs)), desc="end to end"):
                name = build_config_archive(export_dir, store, staged, config, handler=handler_settings)
                sweep = config == shipped
                results["e2e"][name] = {"config": asdict(config), **run_config(bench, name, payloads,
                                                                               args.concurrency, args.seconds, sweep)}
                if sweep:
                    results["single"] = results["e2e"][name].pop("single")
                m = results["e2e"][name]["max"]
                tqdm.write(f"{name}: {m['throughput']:.1f}/s p50 {m['p50_ms']:.0f} p99 {m['p99_ms']:.0f} ms, "
                           f"failures {m['failures']}")
        finally:
            bench.close()
        results["naive"] = run_naive(Path(args.checkpoint), payloads, args.concurrency, args.seconds, threads, scratch)
        onnx = VARIANTS[default_variant] if VARIANTS[default_variant].runtime == "onnxruntime" else VARIANTS["onnx"]
        results["litserve"] = run_litserve(export_dir / onnx.file_name, payloads, args.concurrency, args.seconds,
                                           model_threads, scratch)
    write_reports(results, output)
    print(json.dumps(ratios(results), indent=2))
    print(f"report: {output}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = add_server_arguments(command_parser(__doc__), output="runs/reports/benchmarks.md")
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt", help="for the naive baseline")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--delays", type=int, nargs="+", default=[2, 5, 10, 25])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--default-variant", default=None, help="default: the one make archive ships")
    parser.add_argument("--seconds", type=float, default=15.0, help="per load")
    parser.add_argument("--model-seconds", type=float, default=2.0, help="per model-only cell")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from benchmarks.json")
    parser.add_argument("--matrix", action="store_true",
                        help="also every variant, batch size, delay and worker split (the whole matrix)")
    parser.add_argument("--only", nargs="*", default=[], metavar="VARIANT,BATCH,DELAY,WORKERS,THREADS",
                        help="also these configurations")
    parser.add_argument("--handler", nargs="*", default=[], metavar="KEY=VALUE",
                        help="handler settings to try on top of handlers/model-config.yaml (e.g. onnx_spin=false)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
