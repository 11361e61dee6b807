"""Model-only throughput on a CUDA GPU: the shipped checkpoint (with its population check, as every served file
runs it) in eager fp32, eager fp16 (channels-last), AOTInductor compiled for the GPU here, and ONNX Runtime's
CUDA provider when the installed onnxruntime has it. Side by side in one process, medians, synchronised.

    python -m loadtest.gpu_bench --checkpoint models/pneumonia/model.pt --output runs/reports/gpu_bench.md

`make bench` measures the whole server; this measures what a GPU worker's model step can give it.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cxr.commands import command_parser
from cxr.report import table, write_markdown_and_json
from cxr.timing import images_per_second
from cxr_core.checkpoint import load_checkpoint, model_from_checkpoint, serving_config
from cxr_core.population import CHECKPOINT_KEY, CheckedModel


def synchronised(run):
    """`run` followed by a wait for the GPU, so that cxr.timing times the kernels and not their launch."""
    def call(batch: torch.Tensor) -> None:
        run(batch)
        torch.cuda.synchronize()

    return call


def compile_aoti(model: torch.nn.Module, config: dict[str, Any], max_batch: int, scratch: Path) -> Any:
    """The AOTInductor package `python -m export --formats aoti` makes, compiled here for this GPU."""
    import torch._inductor

    from export.exporters import export_aoti

    started = time.perf_counter()
    package = export_aoti(model, config, scratch / "model.pt2", max_batch)
    print(f"AOTInductor export + compile for CUDA: {time.perf_counter() - started:.0f} s", flush=True)
    return torch._inductor.aoti_load_package(str(package))


def runners(network: torch.nn.Module, config: dict[str, Any], max_batch: int, scratch: Path,
            aoti: bool = True) -> dict[str, Any]:
    """name -> callable on a CUDA float32 batch."""
    from export.exporters import export_onnx

    fp32 = network.cuda().eval()
    fp16 = copy.deepcopy(fp32).half().to(memory_format=torch.channels_last)  # the check's buffers too
    found: dict[str, Any] = {"eager fp32": lambda x: fp32(x),
                             "eager fp16 channels-last": lambda x: fp16(x.half().to(memory_format=torch.channels_last))}
    if aoti:
        found["AOTInductor (CUDA)"] = compile_aoti(fp32, config, max_batch, scratch)
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            export_onnx(network.cpu(), config, scratch / "model.onnx")
            network.cuda()
            session = ort.InferenceSession(str(scratch / "model.onnx"), providers=["CUDAExecutionProvider"])
            name = session.get_inputs()[0].name
            found["ONNX Runtime CUDA"] = lambda x: session.run(None, {name: x.cpu().numpy()})
        else:
            print("ONNX Runtime has no CUDA provider here: its row is left out", flush=True)
    except ImportError:
        print("onnxruntime is not installed here: its row is left out", flush=True)
    return found


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: loadtest.gpu_bench measures GPUs only (make bench measures the CPU)")
    checkpoint = load_checkpoint(args.checkpoint)
    model, config = model_from_checkpoint(checkpoint), serving_config(checkpoint)
    network = CheckedModel(model, checkpoint[CHECKPOINT_KEY]).eval() if checkpoint.get(CHECKPOINT_KEY) else model
    size, channels = config["preprocessing"]["image_size"], config["preprocessing"]["channels"]
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "checkpoint": args.checkpoint, "rows": {}}
    with tempfile.TemporaryDirectory() as scratch:
        # torch.export and the compilers run outside inference mode
        built = runners(network, config, max(args.batches), Path(scratch), aoti=not args.no_aoti)
        with torch.inference_mode():
            for name, run in built.items():
                results["rows"][name] = {b: images_per_second(
                    synchronised(run), torch.randn(b, channels, size, size, device="cuda"), b,
                    min_seconds=args.seconds) for b in args.batches}
                print(name, {b: round(v) for b, v in results["rows"][name].items()}, flush=True)
    lines = [f"# Model-only throughput on {results['gpu']}", "",
             f"`python -m loadtest.gpu_bench` (torch {results['torch']}, `{args.checkpoint}` with its population "
             f"check, {size} px input): images/s, medians over {args.seconds:.0f} s per cell.", "",
             *table(["backend", *(f"batch {b}" for b in args.batches)],
                    [[name, *(f"{v:.0f}" for v in row.values())] for name, row in results["rows"].items()]), ""]
    write_markdown_and_json(args.output, "\n".join(lines), results)
    print("\n".join(lines))
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-aoti", action="store_true", help="leave the AOTInductor row out")
    parser.add_argument("--output", default="runs/reports/gpu_bench.md")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
