"""Package exported model files as TorchServe archives with our handler and the `cxr_core` package.

    python -m export.archive --export-dir runs/export-pneumonia --model-store model_store --default onnx

Writes `<name>_{eager,ts,onnx,int8,aoti}.mar` and `<name>.mar` (the default variant) for version 1.0; any other version
adds `-<version>` to each file name (`pneumonia-2.0.mar`), so a new version never overwrites the one serving and
`cxr deploy pneumonia-2.0.mar` takes it as it is. Each archive holds the model
file (which embeds its class names, preprocessing and threshold), handlers/cxr_handler.py,
handlers/model-config.yaml, the `cxr_core` package (so train and serve share one preprocessing) and the
out-of-distribution gate (`models/gate/ood_gate.pt`).
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

from cxr.commands import command_parser
from cxr.paths import REPO, SHIPPED_GATE
from cxr_core.gate import GATE_FILE
from cxr_core.variants import VARIANTS

HANDLER = REPO / "handlers" / "cxr_handler.py"
CORE = REPO / "cxr_core"
DEFAULT_MODEL_CONFIG = REPO / "handlers" / "model-config.yaml"


FIRST_VERSION = "1.0"


def archive_stem(name: str, variant: str | None, version: str) -> str:
    """`pneumonia`, `pneumonia_onnx`, `pneumonia-2.0`, `pneumonia_onnx-2.0`: the archive's file name without .mar."""
    stem = name if variant is None else f"{name}_{variant}"
    return stem if version == FIRST_VERSION else f"{stem}-{version}"


def fastest_exact_variant(export_dir: Path) -> str:
    """The variant with the highest CPU images/s at batch 8 among those that passed fp32 parity with eager.

    int8 is left out: it passes its own (agreement/AUC) check but does not give eager's probabilities.
    """
    report = json.loads((export_dir / "export_report.json").read_text())["variants"]
    candidates = {name: report[name] for name, variant in VARIANTS.items()
                  if variant.exact and report.get(name, {}).get("check") == "pass"}
    return max(candidates, key=lambda variant: candidates[variant]["cpu_images_per_s_b8"])


def serving_modules() -> list[str]:
    """The files of the `cxr_core` package: what every archive carries beside the handler and the model."""
    return sorted(path.name for path in CORE.glob("*.py"))


def stage_serving_code(folder: Path, gate: Path | None = None) -> Path:
    """A folder holding the `cxr_core` package (no training, data or server code), and the out-of-distribution
    gate's checkpoint when one is given."""
    package = folder / CORE.name
    package.mkdir(parents=True)
    for name in serving_modules():
        shutil.copy2(CORE / name, package / name)
    if gate is not None:
        shutil.copy2(gate, folder / GATE_FILE)
    return folder


def build_archive(model_file: Path, archive_name: str, version: str, model_store: Path, staged: Path,
                  config_file: Path = DEFAULT_MODEL_CONFIG) -> Path:
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [
        str(archiver), "--model-name", archive_name, "--version", version, "--serialized-file", str(model_file),
        "--handler", str(HANDLER), "--extra-files", str(staged),
        "--config-file", str(config_file), "--export-path", str(model_store), "--force",
    ]
    subprocess.run(command, check=True)
    return model_store / f"{archive_name}.mar"


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--export-dir", default="runs/export-pneumonia", help="output of `python -m export`")
    parser.add_argument("--model-store", default="model_store")
    parser.add_argument("--name", default="pneumonia", help="archive base name")
    parser.add_argument("--version", default=FIRST_VERSION, help="other versions get -<version> in their file names")
    parser.add_argument("--default", default="auto", choices=["auto", *sorted(VARIANTS)],
                        help="variant packed as <name>.mar (auto: the fastest that matches eager)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variant archives to write beside <name>.mar (none: only <name>.mar)")
    parser.add_argument("--model-config", default=str(DEFAULT_MODEL_CONFIG),
                        help="TorchServe model-config.yaml packed into every archive (workers, batching, handler)")
    parser.add_argument("--gate", default=str(SHIPPED_GATE),
                        help="out-of-distribution gate checkpoint packed into every archive ('' for none)")
    return parser


def main(args: argparse.Namespace) -> list[Path]:
    export_dir, model_store = Path(args.export_dir), Path(args.model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    if args.default == "auto":
        args.default = fastest_exact_variant(export_dir)
        print(f"default variant: {args.default} (fastest at batch 8 among those matching eager)")
    if not (export_dir / VARIANTS[args.default].file_name).is_file():
        raise SystemExit(f"missing {export_dir / VARIANTS[args.default].file_name} (run `python -m export` first)")
    variants = [v for v in args.variants if (export_dir / VARIANTS[v].file_name).is_file()]
    for variant in sorted(set(args.variants) - set(variants)):
        print(f"skipping {args.name}_{variant}.mar: {export_dir / VARIANTS[variant].file_name} was not exported")
    built = []
    with tempfile.TemporaryDirectory() as scratch:
        gate = Path(args.gate) if args.gate else None
        if gate is not None and not gate.is_file():
            raise SystemExit(f"missing gate {gate} (train it with `make gate`, or pass --gate '')")
        staged = stage_serving_code(Path(scratch) / "extra", gate)
        jobs = [(variant, archive_stem(args.name, variant, args.version)) for variant in variants] + \
            [(args.default, archive_stem(args.name, None, args.version))]
        for variant, archive_name in tqdm(jobs, desc="archives"):
            model_file = export_dir / VARIANTS[variant].file_name
            built.append(build_archive(model_file, archive_name, args.version, model_store, staged,
                                       Path(args.model_config)))
    for path in built:
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return built


if __name__ == "__main__":
    main(get_args_parser().parse_args())
