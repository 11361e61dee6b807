"""Export a checkpoint to TorchScript, ONNX, ONNX int8 and AOTInductor, and check each against eager PyTorch.

    python -m export --checkpoint models/pneumonia/model.pt --output-dir runs/export-pneumonia

Checks run on real validation images: fp32 variants must match eager within --tolerance in probability with
identical labels; int8 must keep --int8-min-agreement label agreement and lose at most --int8-max-auc-drop
AUC. A model with a population check (cxr_core.population) exports it as a second output, checked the same way:
fp32 score within --tolerance x its limit with identical inside/outside decisions, int8 decisions agreeing
on at least --int8-min-agreement of the images. A file is only left in --output-dir when its check passed;
a failed check exits non-zero with the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.data import XrayFolder, resolve_data_root
from cxr.metrics import roc_auc
from cxr.paths import EXAMPLE_XRAYS
from cxr.timing import images_per_second
from cxr_core.backends import load_backend
from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint, serving_config, write_checkpoint
from cxr_core.population import CHECKPOINT_KEY, CheckedModel, outside
from cxr_core.preprocessing import EvalPreset
from cxr_core.variants import EXPORTED, VARIANTS
from export.exporters import export_aoti, export_onnx, export_torchscript, quantize_onnx_int8


def load_images(dataset: XrayFolder, limit: int | None, seed: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images (eval transform) and labels of `limit` random readable images of `dataset`."""
    indices = list(range(len(dataset)))
    random.Random(seed).shuffle(indices)
    images, labels = [], []
    for index in tqdm(indices[:limit] if limit else indices, desc=desc, leave=False):
        item = dataset[index]
        if item is not None:
            images.append(item[0].numpy())
            labels.append(item[1])
    return np.stack(images), np.asarray(labels)


def batched_run(backend: Any, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and population scores (None without a check) of `images`, in batches."""
    runs = [backend.run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    population = None if runs[0][1] is None else np.concatenate([scores for _, scores in runs])
    return np.concatenate([probabilities for probabilities, _ in runs]), population


def population_parity(reference: np.ndarray | None, candidate: np.ndarray | None, limit: float | None) -> dict:
    """How far the check's scores moved, in units of its limit, and how often inside/outside agrees."""
    if reference is None or limit is None:
        return {"population_diff": float("nan"), "population_agreement": float("nan")}
    if candidate is None:
        return {"population_diff": float("inf"), "population_agreement": 0.0}
    return {"population_diff": float(np.abs(reference - candidate).max() / limit),
            "population_agreement": float((outside(reference, limit) == outside(candidate, limit)).mean())}


def parity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, config: dict[str, Any]) -> dict:
    serving = ServingConfig.from_dict(config)
    positive = serving.positive_index
    agreement = float((serving.decide(reference) == serving.decide(candidate)).mean())
    auc = (lambda p: roc_auc(labels == positive, p[:, positive])) if positive is not None else \
        (lambda p: float(np.mean([roc_auc(labels == k, p[:, k]) for k in range(p.shape[1])])))
    if labels is None:
        return {"max_abs_diff": float(np.abs(reference - candidate).max()), "label_agreement": agreement,
                "auc": float("nan"), "auc_drop": 0.0}
    return {"max_abs_diff": float(np.abs(reference - candidate).max()), "label_agreement": agreement,
            "auc": auc(candidate), "auc_drop": auc(reference) - auc(candidate)}


def load_timed(path: Path, threads: int) -> tuple[Any, float]:
    """The backend for `path` on CPU and the seconds its loading took."""
    started = time.perf_counter()
    backend = load_backend(path, "cpu", threads=threads)
    return backend, time.perf_counter() - started


def measure(backend: Any, images: np.ndarray, repeats: int) -> dict[str, float]:
    return {f"cpu_images_per_s_b{b}": images_per_second(backend.predict, images[:b], b, repeats) for b in (1, 8)}


def markdown(rows: dict[str, dict[str, Any]], threads: int, check_source: str) -> str:
    lines = ["| variant | file | MB | load s | CPU img/s b1 | CPU img/s b8 | max prob diff | label agreement | "
             "AUC (val) | AUC drop | population diff / limit | inside agreement | check |", "|---" * 13 + "|"]
    for name, row in rows.items():
        lines.append(
            f"| {VARIANTS[name].label} | `{row['file']}` | {row['file_mb']:.1f} | {row['load_seconds']:.2f} | "
            f"{row['cpu_images_per_s_b1']:.1f} | {row['cpu_images_per_s_b8']:.1f} | {row['max_abs_diff']:.2e} | "
            f"{row['label_agreement']:.4f} | {row['auc']:.4f} | {row['auc_drop']:+.4f} | "
            f"{row['population_diff']:.2e} | {row['population_agreement']:.4f} | {row['check']} |"
        )
    lines += ["", f"Parity on {check_source} against eager fp32 PyTorch; speeds are medians "
              f"of timed runs in one process, {threads} CPU threads, model only (no decoding)."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt")
    parser.add_argument("--data", default=None, help="ImageFolder root (default: $CXR_DATA/pneumonia)")
    parser.add_argument("--output-dir", default="runs/export-pneumonia")
    parser.add_argument("--formats", nargs="+", default=EXPORTED, choices=EXPORTED, help="variants to export")
    parser.add_argument("--check-images", default=0, type=int, help="val images for the checks (0: all)")
    parser.add_argument("--calibration-images", default=512, type=int, help="training images for int8 calibration")
    parser.add_argument("--threshold", default=None, type=float,
                        help="decision threshold on p(positive class) to embed instead of the checkpoint's")
    parser.add_argument("--tolerance", default=1e-4, type=float, help="max probability difference for fp32")
    parser.add_argument("--int8-min-agreement", default=0.99, type=float)
    parser.add_argument("--int8-max-auc-drop", default=0.005, type=float)
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--repeats", default=7, type=int)
    parser.add_argument("--report", default=None, help="also write the Markdown table here (e.g. docs/export.md)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(args.checkpoint)
    if args.threshold is not None:  # another operating point, embedded in every exported file (the input stays)
        if checkpoint.get("positive_class") is None:
            raise SystemExit(f"{args.checkpoint} decides by argmax (no positive class): --threshold does not apply")
        print(f"threshold {checkpoint['threshold']} -> {args.threshold}: the test figures recorded in the "
              "checkpoint were measured at the old one")
        checkpoint["threshold"] = float(args.threshold)
    config = serving_config(checkpoint)
    model = model_from_checkpoint(checkpoint)
    check = checkpoint.get(CHECKPOINT_KEY)
    network = CheckedModel(model, check).eval() if check else model  # what the exported files compute
    limit = check["limit"] if check else None
    data_root = resolve_data_root(args.data)
    preset = EvalPreset(ServingConfig.from_checkpoint(checkpoint).preprocessing)
    formats = list(args.formats)
    if (data_root / "val").is_dir():
        val_images, val_labels = load_images(
            XrayFolder(data_root / "val", preset, checkpoint["class_names"]), args.check_images, 0, "val images")
        check_source = f"{len(val_images)} validation images"
    else:
        # A clone without the data can still export and serve: fp32 parity is checked on the committed example
        # X-rays, and int8 (which needs the training images to calibrate) is left out.
        print(f"WARNING: {data_root / 'val'} not found: checking on {EXAMPLE_XRAYS} and skipping int8")
        val_images, _ = load_images(XrayFolder(EXAMPLE_XRAYS, preset), None, 0,  # labels unused: any classes
                                    "example X-rays")
        val_labels, check_source = None, f"the {len(val_images)} example X-rays (no data found)"
        formats = [name for name in formats if name != "int8"]
    eager_path = output_dir / VARIANTS["eager"].file_name
    if args.threshold is None:
        eager_path.write_bytes(Path(args.checkpoint).read_bytes())  # byte for byte: its sha256 names the model
    else:
        write_checkpoint(eager_path, checkpoint)
    reference, reference_population = batched_run(load_backend(eager_path), val_images)
    rows: dict[str, dict[str, Any]] = {}
    failures = []
    steps = tqdm(["eager", *formats], desc="export")
    for name in steps:
        steps.set_postfix(variant=name)
        path = output_dir / VARIANTS[name].file_name
        if name == "ts":
            export_torchscript(network, config, path)
        elif name == "onnx":
            export_onnx(network, config, path)
        elif name == "aoti":
            export_aoti(network, config, path)
        elif name == "int8":
            fp32 = output_dir / VARIANTS["onnx"].file_name
            if not fp32.is_file():
                export_onnx(network, config, fp32)
            calibration, _ = load_images(XrayFolder(data_root / "train", preset, checkpoint["class_names"]),
                                         args.calibration_images, 1, "calibration images")
            quantize_onnx_int8(fp32, path, calibration)
        backend, load_seconds = load_timed(path, args.threads)
        probabilities, population = batched_run(backend, val_images)
        row = parity(reference, probabilities, val_labels, config)
        row.update(population_parity(reference_population, population, limit))
        checked = check is not None
        if not VARIANTS[name].exact:
            ok = row["label_agreement"] >= args.int8_min_agreement and row["auc_drop"] <= args.int8_max_auc_drop \
                and (not checked or row["population_agreement"] >= args.int8_min_agreement)
        else:
            ok = row["max_abs_diff"] <= args.tolerance and row["label_agreement"] == 1.0 \
                and (not checked or (row["population_diff"] <= args.tolerance
                                     and row["population_agreement"] == 1.0))
        row.update(file=path.name, check="pass" if ok else "FAIL", file_mb=path.stat().st_size / 1e6,
                   load_seconds=load_seconds, **measure(backend, val_images, args.repeats))
        rows[name] = row
        if not ok:
            numbers = {key: row[key] for key in ("max_abs_diff", "label_agreement", "auc_drop",
                                                 "population_diff", "population_agreement")}
            failures.append(f"{name}: {json.dumps(numbers)}")
            path.rename(path.with_suffix(path.suffix + ".failed"))
    table = markdown(rows, args.threads, check_source)
    print(table)
    report = {"checkpoint": str(args.checkpoint), "checked_on": check_source, "variants": rows}
    (output_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(f"# Export variants of `{args.checkpoint}`\n\nWritten by `make export` "
                                     f"(`python -m export --report {args.report}`).\n\n{table}")
    if failures:
        print("export check failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
