"""What the population check costs: the same checkpoint exported to ONNX with and without its check, timed
side by side (alternating rounds, medians): the model alone, as a served worker runs it (1 thread), and with
`--end-to-end` both archives behind one TorchServe under the same closed-loop load (the shipped
model-config.yaml: workers, batching; the check set to `warn` so every sample is answered).

    python -m loadtest.check_cost --checkpoint models/pneumonia/model.pt --end-to-end
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.commands import command_parser
from cxr.paths import SHIPPED_GATE, samples_dir
from cxr.timing import images_per_second
from cxr_core.backends import OnnxBackend
from cxr_core.checkpoint import load_checkpoint, model_from_checkpoint, serving_config
from cxr_core.population import CHECKPOINT_KEY, CheckedModel
from export import archive as archive_cli
from export.exporters import example_input, export_onnx
from loadtest.bench_server import BenchConfig, BenchServer, build_config_archive, read_payloads
from loadtest.load import closed_loop


def end_to_end(plain: Path, checked: Path, gate: str, samples: str, rounds: int, seconds: float,
               concurrency: int, scratch: Path) -> dict[str, Any]:
    """Requests/s of the two archives behind one TorchServe, alternating closed-loop rounds."""
    import yaml

    base = yaml.safe_load(archive_cli.DEFAULT_MODEL_CONFIG.read_text())
    config = BenchConfig("onnx", base["batchSize"], base["maxBatchDelay"], base["minWorkers"],
                         base["handler"]["threads"])
    store = scratch / "store"
    store.mkdir()
    staged = archive_cli.stage_serving_code(scratch / "extra", Path(gate))
    payloads = read_payloads(samples)
    bench = BenchServer(scratch / "serve", store)
    rates: dict[str, list[float]] = {"plain": [], "checked": []}
    try:
        for name, path in (("plain", plain), ("checked", checked)):
            folder = scratch / name
            folder.mkdir()
            (folder / "model.onnx").write_bytes(path.read_bytes())
            built = build_config_archive(folder, store, staged, config)
            (store / f"{built}.mar").rename(store / f"cost_{name}.mar")
            bench.register(f"cost_{name}")
            closed_loop(bench.target(f"cost_{name}"), payloads, concurrency, 3)  # warm-up
        for _ in range(rounds):
            for name in rates:
                result = closed_loop(bench.target(f"cost_{name}"), payloads, concurrency, seconds)
                if result["failures"]:
                    raise SystemExit(f"{name}: {result['failures']} requests failed")
                rates[name].append(result["throughput"])
    finally:
        bench.close()
    plain_rate, checked_rate = (statistics.median(rates[n]) for n in ("plain", "checked"))
    print(f"end to end: plain {plain_rate:.1f} req/s, checked {checked_rate:.1f} req/s, "
          f"cost {100 * (1 - checked_rate / plain_rate):.1f}% (rounds: {rates})", flush=True)
    return {"plain_requests_per_s": plain_rate, "checked_requests_per_s": checked_rate,
            "cost": 1 - checked_rate / plain_rate, "rounds": rates}


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    if not checkpoint.get(CHECKPOINT_KEY):
        raise SystemExit(f"{args.checkpoint} has no population check (make population)")
    model, config = model_from_checkpoint(checkpoint), serving_config(checkpoint)
    results: dict[str, Any] = {"checkpoint": args.checkpoint, "threads": args.threads, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as scratch:
        plain, checked = Path(scratch) / "plain.onnx", Path(scratch) / "checked.onnx"
        export_onnx(model, config, plain)
        export_onnx(CheckedModel(model, checkpoint[CHECKPOINT_KEY]).eval(), config, checked)
        backends = {name: OnnxBackend(path, threads=args.threads, spin=False)
                    for name, path in (("plain", plain), ("checked", checked))}
        for batch_size in args.batch_sizes:
            batch = example_input(config, batch_size).numpy().astype(np.float32)
            rounds: dict[str, list[float]] = {"plain": [], "checked": []}
            for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
                for name, backend in backends.items():
                    rounds[name].append(images_per_second(backend.predict, batch, batch_size, args.repeats))
            plain_rate, checked_rate = (statistics.median(rounds[n]) for n in ("plain", "checked"))
            results[f"b{batch_size}"] = {"plain_images_per_s": plain_rate, "checked_images_per_s": checked_rate,
                                         "cost": 1 - checked_rate / plain_rate}
            print(f"batch {batch_size}: plain {plain_rate:.1f} img/s, checked {checked_rate:.1f} img/s, "
                  f"cost {100 * (1 - checked_rate / plain_rate):.1f}%", flush=True)
        if args.end_to_end:
            results["end_to_end"] = end_to_end(plain, checked, args.gate, args.samples, args.rounds, args.seconds,
                                               args.concurrency, Path(scratch))
    print(json.dumps(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--end-to-end", action="store_true", help="also through TorchServe")
    parser.add_argument("--gate", default=str(SHIPPED_GATE))
    parser.add_argument("--samples", default=str(samples_dir()), help="folder of X-rays to send")
    parser.add_argument("--seconds", type=float, default=10.0, help="per end-to-end round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output", default=None, help="also write the results here (JSON)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
