"""Package exported model files as TorchServe archives with our handler and the shared `cxr` code.

    python -m export.archive --export-dir runs/export --model-store model_store --default onnx

Writes `<name>_{eager,ts,onnx,int8}.mar` and `<name>.mar` (the default variant). Each archive holds the model
file (which embeds its class names, preprocessing and threshold), handlers/cxr_handler.py,
handlers/model-config.yaml, the serving part of the `cxr` package (so train and serve share one preprocessing)
and the out-of-distribution gate (`models/gate/ood_gate.pt`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
SERVING_MODULES = ("__init__.py", "preprocessing.py", "models.py", "checkpoint.py", "backends.py", "metrics.py",
                   "explain.py", "gate.py")
DEFAULT_GATE = REPO / "models" / "gate" / "ood_gate.pt"
VARIANTS = {"eager": "model.pt", "ts": "model.ts", "onnx": "model.onnx", "int8": "model.int8.onnx"}
REPORT_NAMES = {"eager": "eager", "ts": "torchscript", "onnx": "onnx", "int8": "int8"}


def fastest_exact_variant(export_dir: Path) -> str:
    """The variant with the highest CPU images/s at batch 8 among those that passed fp32 parity with eager.

    int8 is left out: it passes its own (agreement/AUC) check but does not give eager's probabilities.
    """
    report = json.loads((export_dir / "export_report.json").read_text())["variants"]
    candidates = {variant: report[name] for variant, name in REPORT_NAMES.items()
                  if variant != "int8" and report.get(name, {}).get("check") == "pass"}
    return max(candidates, key=lambda variant: candidates[variant]["cpu_images_per_s_b8"])


def stage_serving_code(folder: Path, gate: Path | None = None) -> Path:
    """A folder holding `cxr/` with just the modules the handler imports (no training code), and the
    out-of-distribution gate's checkpoint when one is given."""
    package = folder / "cxr"
    package.mkdir(parents=True)
    for name in SERVING_MODULES:
        shutil.copy2(REPO / "cxr" / name, package / name)
    if gate is not None:
        from cxr.gate import GATE_FILE

        shutil.copy2(gate, folder / GATE_FILE)
    return folder


def build_archive(model_file: Path, archive_name: str, version: str, model_store: Path, staged: Path,
                  config_file: Path = REPO / "handlers" / "model-config.yaml") -> Path:
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [
        str(archiver), "--model-name", archive_name, "--version", version, "--serialized-file", str(model_file),
        "--handler", str(REPO / "handlers" / "cxr_handler.py"), "--extra-files", str(staged),
        "--config-file", str(config_file), "--export-path", str(model_store), "--force",
    ]
    subprocess.run(command, check=True)
    return model_store / f"{archive_name}.mar"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", default="runs/export", help="output of `python -m export`")
    parser.add_argument("--model-store", default="model_store")
    parser.add_argument("--name", default="pneumonia", help="archive base name")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--default", default="auto", choices=["auto", *sorted(VARIANTS)],
                        help="variant packed as <name>.mar (auto: the fastest that matches eager)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--gate", default=str(DEFAULT_GATE),
                        help="out-of-distribution gate checkpoint packed into every archive ('' for none)")
    return parser


def main(args: argparse.Namespace) -> list[Path]:
    export_dir, model_store = Path(args.export_dir), Path(args.model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    if args.default == "auto":
        args.default = fastest_exact_variant(export_dir)
        print(f"default variant: {args.default} (fastest at batch 8 among those matching eager)")
    if not (export_dir / VARIANTS[args.default]).is_file():
        raise SystemExit(f"missing {export_dir / VARIANTS[args.default]} (run `python -m export` first)")
    variants = [v for v in args.variants if (export_dir / VARIANTS[v]).is_file()]
    for variant in sorted(set(args.variants) - set(variants)):
        print(f"skipping {args.name}_{variant}.mar: {export_dir / VARIANTS[variant]} was not exported")
    built = []
    with tempfile.TemporaryDirectory() as scratch:
        gate = Path(args.gate) if args.gate else None
        if gate is not None and not gate.is_file():
            raise SystemExit(f"missing gate {gate} (train it with `make gate`, or pass --gate '')")
        staged = stage_serving_code(Path(scratch) / "extra", gate)
        jobs = [(variant, f"{args.name}_{variant}") for variant in variants] + [(args.default, args.name)]
        for variant, archive_name in tqdm(jobs, desc="archives"):
            built.append(build_archive(export_dir / VARIANTS[variant], archive_name, args.version, model_store,
                                       staged))
    for path in built:
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return built


if __name__ == "__main__":
    main(get_args_parser().parse_args())
