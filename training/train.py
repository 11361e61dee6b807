"""Train a torchvision CNN from scratch on an ImageFolder tree of chest X-rays.

    python -m training.train --arch resnet18 --image-size 128 --epochs 12 --output-dir runs/resnet18

Writes to --output-dir: `last.pt` (resumable with --resume), `best.pt` (best val AUC), `model.pt` (best
weights + threshold chosen on val + val/test metrics: the file to ship), `metrics.csv`, `curves.png` and
evaluation reports. No pretrained weights are downloaded: every model starts from random weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.data import XrayFolder, collate_skip_invalid, manifest_sha256, resolve_data_root
from cxr.metrics import roc_auc
from cxr.report import figure
from cxr_core.checkpoint import SUMMARY_KEYS, ServingConfig, load_checkpoint, model_from_checkpoint, save_checkpoint
from cxr_core.models import SUPPORTED_ARCHITECTURES, build_model, count_parameters
from cxr_core.preprocessing import EvalPreset, PreprocessConfig, TrainPreset
from training.calibrate import calibrate
from training.evaluate import predict_dataset, write_report

CSV_FIELDS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_auc", "val_accuracy",
              "train_images_per_s", "epoch_seconds"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--data", default=None, help="ImageFolder root (default: $CXR_DATA/pneumonia)")
    parser.add_argument("--arch", default="resnet18", choices=SUPPORTED_ARCHITECTURES)
    parser.add_argument("--image-size", default=128, type=int, help="square input side in pixels")
    parser.add_argument("--channels", default=1, type=int, choices=(1, 3), help="1: grayscale stem; 3: replicated")
    parser.add_argument("--epochs", default=12, type=int)
    parser.add_argument("--batch-size", default=32, type=int)
    parser.add_argument("--lr", default=2e-3, type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", default=0.05, type=float)
    parser.add_argument("--warmup-epochs", default=1.0, type=float, help="linear warm-up, then cosine decay")
    parser.add_argument("--label-smoothing", default=0.0, type=float)
    parser.add_argument("--class-weights", default="balanced", choices=("balanced", "none"),
                        help="balanced: loss weights inversely proportional to class frequency")
    parser.add_argument("--patience", default=5, type=int,
                        help="stop after this many epochs without a better val AUC")
    parser.add_argument("--min-sensitivity", default=0.95, type=float, help="recall-first threshold target on val")
    parser.add_argument("--positive-class", default=None, help="disease class of 2-class data (default: not NORMAL)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                        help="autocast dtype (bf16 is slower than fp32 on CPUs without AVX512-BF16/AMX)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster for ResNets here)")
    parser.add_argument("--workers", default=1, type=int, help="DataLoader worker processes")
    parser.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--output-dir", default="runs/default")
    parser.add_argument("--resume", default=None, help="a last.pt to continue from")
    parser.add_argument("--half-checkpoint", action="store_true", help="store model.pt weights as fp16")
    parser.add_argument("--skip-test", action="store_true", help="do not evaluate test/ at the end")
    parser.add_argument("--limit", default=None, type=int, help="use at most this many images per split (smoke runs)")
    parser.add_argument("--mlflow", action="store_true", help="log params and metrics to MLflow (if installed)")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_positive_class(class_names: list[str], requested: str | None) -> str | None:
    """The disease class of a 2-class problem; None (argmax labels) for more classes."""
    if requested is not None:
        if requested not in class_names:
            raise ValueError(f"--positive-class {requested!r} is not one of {class_names}")
        return requested
    if len(class_names) != 2:
        return None
    others = [name for name in class_names if name.upper() != "NORMAL"]
    return others[0] if len(others) == 1 else class_names[1]


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 1% of it."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimisation step on `loss`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def subset(dataset: XrayFolder, limit: int | None, seed: int) -> XrayFolder:
    """Keep a class-stratified random `limit` images (for smoke runs and tests)."""
    if limit is None or limit >= len(dataset):
        return dataset
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in dataset.samples:
        by_class.setdefault(sample[1], []).append(sample)
    per_class = max(1, limit // len(by_class))
    dataset.samples = sorted(s for group in by_class.values() for s in rng.sample(group, min(per_class, len(group))))
    return dataset


def train_one_epoch(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, optimizer: torch.optim.Optimizer, *,
    device: torch.device, first_step: int, total_steps: int, warmup_steps: int, peak_lr: float,
    amp_dtype: torch.dtype | None, channels_last: bool, description: str,
) -> dict[str, float]:
    model.train()
    step, seen, correct, loss_sum = first_step, 0, 0, 0.0
    started = time.perf_counter()
    progress = tqdm(loader, desc=description, leave=False)
    for batch in progress:
        if batch is None:
            continue
        images, targets, _ = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.to(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, warmup_steps, peak_lr)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        update(optimizer, loss)
        step += 1
        seen += len(targets)
        loss_sum += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}")
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_images_per_s": seen / seconds, "steps": step}


def validation_scores(labels: np.ndarray, probabilities: np.ndarray, positive: int | None) -> dict[str, float]:
    """The early-stopping score: AUC of the disease class (2 classes) or macro one-vs-rest AUC."""
    if positive is not None:
        auc = roc_auc(labels == positive, probabilities[:, positive])
    else:
        auc = float(np.nanmean([roc_auc(labels == k, probabilities[:, k]) for k in range(probabilities.shape[1])]))
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "val_auc": auc,
        "val_loss": float(-np.log(np.clip(picked, 1e-7, 1.0)).mean()),
        "val_accuracy": float((probabilities.argmax(1) == labels).mean()),
    }


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    with figure(path, figsize=(10, 4), ncols=2) as (loss_axis, auc_axis):
        loss_axis.plot(epochs, [row["train_loss"] for row in history], label="train")
        loss_axis.plot(epochs, [row["val_loss"] for row in history], label="val")
        loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        loss_axis.legend()
        auc_axis.plot(epochs, [row["val_auc"] for row in history], label="val AUC")
        auc_axis.plot(epochs, [row["val_accuracy"] for row in history], label="val accuracy (argmax)")
        auc_axis.plot(epochs, [row["train_accuracy"] for row in history], label="train accuracy")
        auc_axis.set(xlabel="epoch", title="validation")
        auc_axis.legend()


def main(args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data_root = resolve_data_root(args.data)

    preprocessing = PreprocessConfig(image_size=args.image_size, channels=args.channels)
    train_set = subset(XrayFolder(data_root / "train", TrainPreset(preprocessing)), args.limit, args.seed)
    class_names = train_set.class_names
    val_set = subset(XrayFolder(data_root / "val", EvalPreset(preprocessing), class_names), args.limit, args.seed)
    positive_class = default_positive_class(class_names, args.positive_class)
    positive = class_names.index(positive_class) if positive_class is not None else None
    data_hash = manifest_sha256([train_set, val_set])
    counts = train_set.class_counts()
    print(f"data {data_root}: classes {class_names}, train {counts}, val {val_set.class_counts()}, device {device}")

    model = build_model(args.arch, len(class_names), args.channels).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    print(f"{args.arch}: {count_parameters(model) / 1e6:.2f} M parameters, from scratch (no pretrained weights)")
    weights = None
    if args.class_weights == "balanced":
        weights = torch.tensor([sum(counts) / (len(counts) * c) for c in counts], dtype=torch.float32, device=device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        collate_fn=collate_skip_invalid, generator=generator, persistent_workers=args.workers > 0,
    )
    steps_per_epoch = len(train_loader)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    train_config = {key: value for key, value in vars(args).items()}
    config = ServingConfig(arch=args.arch, class_names=tuple(class_names), positive_class=positive_class,
                           threshold=None, preprocessing=preprocessing)
    common = dict(train_config=train_config, data_manifest_sha256=data_hash)

    start_epoch, best_auc, stale, history = 1, -1.0, 0, []
    if args.resume:
        state = load_checkpoint(args.resume, map_location=device)
        model.load_state_dict(state["state_dict"])
        training_state = state["training_state"]
        optimizer.load_state_dict(training_state["optimizer"])
        start_epoch, best_auc = state["epoch"] + 1, training_state["best_auc"]
        stale, history = training_state["stale_epochs"], training_state["history"]
        torch.set_rng_state(training_state["torch_rng"])
        generator.manual_seed(args.seed + state["epoch"])
        print(f"resumed from {args.resume} at epoch {start_epoch} (best val AUC {best_auc:.4f})")

    tracker = _start_mlflow(args)
    for epoch in range(start_epoch, args.epochs + 1):
        started = time.perf_counter()
        stats = train_one_epoch(
            model, train_loader, criterion, optimizer, device=device, first_step=(epoch - 1) * steps_per_epoch,
            total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=args.lr, amp_dtype=amp_dtype,
            channels_last=args.channels_last, description=f"epoch {epoch}/{args.epochs}",
        )
        labels, probabilities, _ = predict_dataset(model, val_set, device=device, workers=args.workers,
                                                   channels_last=args.channels_last)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **stats,
               **validation_scores(labels, probabilities, positive), "epoch_seconds": time.perf_counter() - started}
        row.pop("steps")
        history.append(row)
        improved = row["val_auc"] > best_auc
        best_auc, stale = (row["val_auc"], 0) if improved else (best_auc, stale + 1)
        print(f"epoch {epoch}: loss {row['train_loss']:.4f}, val AUC {row['val_auc']:.4f}, val loss "
              f"{row['val_loss']:.4f}, {row['train_images_per_s']:.1f} img/s, {row['epoch_seconds']:.0f} s"
              + (" (best)" if improved else ""), flush=True)
        _write_history(history, output_dir / "metrics.csv")
        if tracker:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if improved:
            save_checkpoint(output_dir / "best.pt", model, config, metrics={"val_auc": best_auc}, epoch=epoch,
                            **common)
        training_state = {"optimizer": optimizer.state_dict(), "best_auc": best_auc, "stale_epochs": stale,
                          "history": history, "torch_rng": torch.get_rng_state()}
        save_checkpoint(output_dir / "last.pt", model, config, metrics={"val_auc": row["val_auc"]}, epoch=epoch,
                        training_state=training_state, **common)
        if stale >= args.patience:
            print(f"early stop: no better val AUC for {stale} epochs")
            break
    plot_curves(history, output_dir / "curves.png")
    summary = finalize(args, output_dir, data_root, common)
    if tracker:
        tracker.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, float)})
        tracker.end_run()
    return summary


def finalize(args: argparse.Namespace, output_dir: Path, data_root: Path, common: dict[str, Any]) -> dict[str, Any]:
    """With the best weights: fit the temperature on val, choose the threshold on the calibrated val
    probabilities, evaluate test once, and write model.pt with reports (incl. reliability diagrams)."""
    best = load_checkpoint(output_dir / "best.pt")
    splits = ("val",) if args.skip_test or not (data_root / "test").is_dir() else ("val", "test")
    calibration = calibrate(best, data_root, min_sensitivity=args.min_sensitivity, workers=args.workers,
                            report_dir=output_dir / "reports", splits=splits)
    for split, (report, labels, probabilities) in calibration.scored.items():
        write_report(report, labels, probabilities, best["class_names"], output_dir / "reports", split)
    calibrated = calibration.apply(best)
    metrics, threshold, temperature = calibrated["metrics"], calibrated["threshold"], calibrated["temperature"]
    config = replace(ServingConfig.from_checkpoint(best), threshold=threshold, temperature=temperature)
    save_checkpoint(output_dir / "model.pt", model_from_checkpoint(best), config, metrics=metrics,
                    epoch=best["epoch"], half=args.half_checkpoint, **common)
    (output_dir / "metrics.json").write_text(json.dumps({"threshold": threshold, "temperature": temperature,
                                                         "best_epoch": best["epoch"], **metrics}, indent=2) + "\n")
    shown = ("n", *SUMMARY_KEYS, "ece")
    print(json.dumps({"threshold": threshold, "temperature": temperature,
                      **{split: {k: v for k, v in values.items() if k in shown} for split, values in metrics.items()
                         if isinstance(values, dict)}}, indent=2))
    return {"threshold": threshold, "temperature": temperature, **metrics}


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({key: row[key] for key in CSV_FIELDS})


def _start_mlflow(args: argparse.Namespace) -> Any:
    if not args.mlflow:
        return None
    try:
        import mlflow
    except ImportError:
        print("--mlflow given but mlflow is not installed (pip install mlflow); not tracking")
        return None
    mlflow.start_run(run_name=Path(args.output_dir).name)
    mlflow.log_params({k: str(v) for k, v in vars(args).items()})
    return mlflow


if __name__ == "__main__":
    main(get_args_parser().parse_args())
