"""Compare trained checkpoints side by side: val and test metrics, size, parameters and CPU speed.

    python -m training.compare runs/*/model.pt --output docs/model_comparison.md

Speeds are measured here, in this one process, one model after the other on the same inputs (fp32 eager,
median of repeated timed runs), so the ratios between rows are meaningful even on a noisy machine.
The recommended default is the best on *val* AUC; test figures are shown, never used to choose.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.timing import images_per_second
from cxr_core.checkpoint import load_checkpoint, model_from_checkpoint
from cxr_core.models import count_parameters


def describe(path: Path, repeats: int) -> dict[str, Any]:
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint)
    size = checkpoint["preprocessing"]["image_size"]
    channels = checkpoint["preprocessing"]["channels"]
    history_path = path.parent / "metrics.csv"
    train_speed = None
    if history_path.is_file():
        with open(history_path) as handle:
            train_speed = statistics.median(float(row["train_images_per_s"]) for row in csv.DictReader(handle))
    row = {
        "path": str(path),
        "arch": checkpoint["arch"],
        "image_size": size,
        "epochs": checkpoint["train_config"].get("epochs"),
        "best_epoch": checkpoint["epoch"],
        "parameters_m": count_parameters(model) / 1e6,
        "size_mb": path.stat().st_size / 1e6,
        "train_images_per_s": train_speed,
        "threshold": checkpoint["threshold"],
        "val": checkpoint["metrics"].get("val", {}),
        "test": checkpoint["metrics"].get("test", {}),
    }
    for batch_size in (1, 8):
        batch = torch.randn(batch_size, channels, size, size)
        with torch.inference_mode():
            row[f"cpu_images_per_s_b{batch_size}"] = images_per_second(model, batch, batch_size, repeats)
    return row


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "" if value is None else f"{value:.4f}"


def markdown_table(rows: list[dict[str, Any]], threads: int) -> str:
    best = max(rows, key=lambda row: row["val"].get("roc_auc", row["val"].get("macro_auc", -1)))
    lines = [
        "| arch | size px | params (M) | file (MB) | train img/s | CPU img/s b1 | CPU img/s b8 | "
        "val AUC | val sens | val spec | test AUC | test acc | test sens | test spec | threshold |",
        "|---" * 15 + "|",
    ]
    for row in rows:
        marker = " **(default)**" if row is best else ""
        val, test = row["val"], row["test"]
        val_auc = "roc_auc" if "roc_auc" in val else "macro_auc"
        lines.append(
            f"| {row['arch']}{marker} | {row['image_size']} | {row['parameters_m']:.2f} | {row['size_mb']:.1f} | "
            f"{row['train_images_per_s'] or 0:.1f} | {row['cpu_images_per_s_b1']:.1f} | "
            f"{row['cpu_images_per_s_b8']:.1f} | {_cell(val, val_auc)} | {_cell(val, 'sensitivity')} | "
            f"{_cell(val, 'specificity')} | {_cell(test, val_auc)} | {_cell(test, 'accuracy')} | "
            f"{_cell(test, 'sensitivity')} | {_cell(test, 'specificity')} | "
            f"{row['threshold'] if row['threshold'] is None else round(row['threshold'], 4)} |"
        )
    lines += ["", f"CPU speed: fp32 eager, {threads} torch threads, median of timed runs in one process.",
              f"Best on val AUC: **{best['arch']}** ({best['path']})."]
    return "\n".join(lines) + "\n"


INTRO = """# Architecture comparison

Written by `make compare` (`python -m training.compare runs/*/model.pt`). Each candidate was trained from
scratch with the same budget by `make train-candidates` (`training/train_candidates.sh`): same data, 128 px
grayscale input, 12 epochs, batch 32, AdamW 2e-3 with warm-up and cosine decay, seed 0. The threshold of each
is chosen on val (sensitivity >= 0.95) and the default is the best on **val** AUC; test columns are
reported once, for information, and were not used to choose.

"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("checkpoints", nargs="+", help="model.pt files to compare")
    parser.add_argument("--output", default=None, help="write the Markdown table here as well as printing it")
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--repeats", default=7, type=int)
    return parser


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    rows = [describe(Path(path), args.repeats) for path in tqdm(args.checkpoints, desc="models")]
    table = markdown_table(rows, args.threads)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(INTRO + table)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
