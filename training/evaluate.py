"""Evaluate a checkpoint on one split: metrics with bootstrap intervals, JSON + Markdown report, ROC and
confusion-matrix plots. The threshold is the checkpoint's own (chosen on val), never tuned here.

    python -m training.evaluate --checkpoint models/pneumonia/model.pt --split test
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.data import XrayFolder, collate_skip_invalid, resolve_data_root
from cxr.metrics import classification_report, roc_curve
from cxr.report import figure, table
from cxr_core.checkpoint import SUMMARY_KEYS, ServingConfig, load_checkpoint, model_from_checkpoint, preprocess_config
from cxr_core.decision import apply_temperature
from cxr_core.preprocessing import EvalPreset


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: XrayFolder,
    *,
    batch_size: int = 64,
    workers: int = 1,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, softmax probabilities and file paths for every readable image of `dataset`."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skip_invalid
    )
    model.eval()
    labels, probabilities, paths = [], [], []
    for batch in tqdm(loader, desc=progress, leave=False, disable=progress is None):
        if batch is None:
            continue
        images, targets, indices = batch
        images = images.to(device)
        if channels_last:
            images = images.to(memory_format=torch.channels_last)
        probabilities.append(torch.softmax(model(images).float(), dim=1).cpu().numpy())
        labels.append(targets.numpy())
        paths.extend(str(dataset.samples[i][0]) for i in indices.tolist())
    return np.concatenate(labels), np.concatenate(probabilities), paths


def evaluate_checkpoint(
    checkpoint: dict[str, Any], data_root: Path, split: str, *, batch_size: int = 64, workers: int = 1,
    bootstrap: int = 1000,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of `checkpoint` on `data_root/split` at the checkpoint's threshold, on probabilities calibrated
    with its temperature (as served)."""
    model = model_from_checkpoint(checkpoint)
    dataset = XrayFolder(
        data_root / split, EvalPreset(preprocess_config(checkpoint)), class_names=checkpoint["class_names"]
    )
    labels, probabilities, _ = predict_dataset(
        model, dataset, batch_size=batch_size, workers=workers, progress=f"eval {split}"
    )
    probabilities = apply_temperature(probabilities, float(checkpoint.get("temperature", 1.0)))
    serving = ServingConfig.from_checkpoint(checkpoint)
    report = classification_report(labels, probabilities, list(serving.class_names),
                                   positive_index=serving.positive_index, threshold=serving.threshold,
                                   bootstrap=bootstrap)
    report["skipped_files"] = dataset.skipped
    return report, labels, probabilities


def _format(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def markdown_report(report: dict[str, Any], class_names: list[str], title: str) -> str:
    """A human-readable summary of `classification_report` output."""
    ci = report.get("ci95", {})
    lines = [f"# {title}", "", f"Images: {report['n']}; threshold: {report.get('threshold')}", ""]
    lines += [*table(["metric", "value", "95% CI (bootstrap)"])]
    for key in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1",
                "balanced_accuracy", "macro_auc"):
        if key in report:
            interval = ci.get(key)
            shown = f"{interval[0]:.4f} - {interval[1]:.4f}" if interval else ""
            lines.append(f"| {key} | {_format(report[key])} | {shown} |")
    lines += ["", *table(["class", "support", "sensitivity", "specificity", "precision", "F1", "AUC (one-vs-rest)"])]
    for name in class_names:
        row = report["per_class"][name]
        lines.append(
            f"| {name} | {row['support']} | {_format(row['sensitivity'])} | {_format(row['specificity'])} | "
            f"{_format(row['precision'])} | {_format(row['f1'])} | {_format(row['auc'])} |"
        )
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| | " + " | ".join(class_names) + " |", "|---" * (len(class_names) + 1) + "|"]
    for name, row in zip(class_names, report["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    with figure(path, figsize=(5, 5), dpi=120) as axis:
        indices = [len(class_names) - 1] if len(class_names) == 2 else range(len(class_names))
        for index in indices:
            fpr, tpr, _ = roc_curve(labels == index, probabilities[:, index])
            axis.plot(fpr, tpr, label=class_names[index])
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        axis.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
        axis.legend(loc="lower right")


def plot_confusion(matrix: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    values = np.asarray(matrix)
    size = (1.4 * len(class_names) + 2, 1.2 * len(class_names) + 1.6)
    with figure(path, figsize=size, dpi=120) as axis:
        axis.imshow(values, cmap="Blues")
        for (row, column), count in np.ndenumerate(values):
            colour = "white" if count > values.max() / 2 else "black"
            axis.text(column, row, str(count), ha="center", va="center", color=colour)
        axis.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
        axis.set_yticks(range(len(class_names)), class_names)
        axis.set(xlabel="predicted", ylabel="true", title=title)


def write_report(
    report: dict[str, Any], labels: np.ndarray, probabilities: np.ndarray, class_names: list[str],
    output_dir: Path, name: str,
) -> None:
    """`<name>.json`, `<name>.md`, `<name>_roc.png` and `<name>_confusion.png` in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / f"{name}.md").write_text(markdown_report(report, class_names, name))
    plot_roc(labels, probabilities, class_names, output_dir / f"{name}_roc.png", f"ROC - {name}")
    plot_confusion(report["confusion_matrix"], class_names, output_dir / f"{name}_confusion.png", name)


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt", help="checkpoint to evaluate")
    parser.add_argument("--data", default=None, help="ImageFolder root (default: $CXR_DATA/pneumonia)")
    parser.add_argument("--split", default="test", help="split folder to evaluate (val or test)")
    parser.add_argument("--output-dir", default="runs/evaluate", help="where reports go")
    parser.add_argument("--batch-size", default=64, type=int)
    parser.add_argument("--workers", default=1, type=int, help="DataLoader worker processes")
    parser.add_argument("--bootstrap", default=1000, type=int, help="bootstrap resamples for 95%% intervals")
    parser.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    report, labels, probabilities = evaluate_checkpoint(
        checkpoint, resolve_data_root(args.data), args.split, batch_size=args.batch_size, workers=args.workers,
        bootstrap=args.bootstrap,
    )
    output_dir = Path(args.output_dir)
    write_report(report, labels, probabilities, checkpoint["class_names"], output_dir, args.split)
    headline = {key: report[key] for key in SUMMARY_KEYS if key in report}
    print(json.dumps({"split": args.split, "n": report["n"], **headline}, indent=2))
    print(f"reports written to {output_dir}/{args.split}.{{json,md}}, {args.split}_roc.png, {args.split}_confusion.png")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
