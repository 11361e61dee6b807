"""How much of a multi-source classifier's skill is the source? Two probes, written to a Markdown report.

    python -m training.source_bias --checkpoint models/cxr4/model.pt   # data: multiclass/ under $CXR_DATA
        # probe: pneumonia/test; report: runs/reports/cxr4/source_bias.md (make source-bias REPORTS=docs)

1. Cross-source probe: the model labels images of known classes that come from another source (by default the
   Kermany pediatric test split: NORMAL and PNEUMONIA). In the 4-class set, NORMAL comes mostly from the COVID-19
   Radiography Database while PNEUMONIA is Kermany pediatric; a model that learned "pediatric Kermany film ->
   PNEUMONIA" will call Kermany NORMAL images PNEUMONIA.
2. Image statistics alone: a logistic regression on each image's 32-bin grey-level histogram (plus mean, std,
   original width and height), fitted on train, scored on test. Histograms carry no anatomy; whatever such a
   model gets right, it gets from exposure, processing and size, i.e. mostly from the source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.data import XrayFolder, image_files
from cxr.metrics import classification_report
from cxr.paths import data_root
from cxr.report import table, write_markdown_and_json
from cxr_core.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_config
from cxr_core.decision import apply_temperature
from cxr_core.preprocessing import EvalPreset, load_image
from training.evaluate import evaluate_checkpoint, predict_dataset


def image_statistics(path: Path) -> np.ndarray:
    """32-bin normalised histogram of the grey levels, mean, std, and the file's width and height."""
    image = load_image(path)
    width, height = image.size
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    histogram = np.histogram(pixels, bins=32, range=(0, 1))[0] / pixels.size
    return np.concatenate([histogram, [pixels.mean(), pixels.std(), width / 1000, height / 1000]])


def split_statistics(root: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for index, name in enumerate(class_names):
        files = image_files(root / name)
        for path in tqdm(files, desc=f"{root.name}/{name}", leave=False):
            features.append(image_statistics(path))
            labels.append(index)
    return np.stack(features), np.asarray(labels)


def statistics_only(data_root: Path, class_names: list[str]) -> dict[str, dict[str, Any]]:
    """Test scores of logistic regressions on grey-level statistics, without and with the image size."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = split_statistics(data_root / "train", class_names)
    test_x, test_y = split_statistics(data_root / "test", class_names)
    results = {}
    for name, columns in (("grey levels", slice(0, 34)), ("grey levels + image size", slice(0, 36))):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        model.fit(train_x[:, columns], train_y)
        report = classification_report(test_y, model.predict_proba(test_x[:, columns]), class_names, bootstrap=0)
        results[name] = {key: report[key] for key in ("n", "accuracy", "balanced_accuracy", "macro_auc",
                                                      "confusion_matrix")}
    return results


def cross_source(checkpoint: dict[str, Any], probe_root: Path) -> dict[str, dict[str, int]]:
    """For each class folder of the probe that the model knows: how many of its images get each label."""
    names = checkpoint["class_names"]
    probe_classes = [p.name for p in sorted(probe_root.iterdir()) if p.is_dir() and p.name in names]
    dataset = XrayFolder(probe_root, EvalPreset(preprocess_config(checkpoint)), class_names=probe_classes)
    labels, probabilities, _ = predict_dataset(model_from_checkpoint(checkpoint), dataset, progress="probe")
    predicted = apply_temperature(probabilities, float(checkpoint.get("temperature", 1.0))).argmax(axis=1)
    return {probe_classes[k]: {name: int(((labels == k) & (predicted == j)).sum()) for j, name in enumerate(names)}
            for k in range(len(probe_classes))}


def markdown(checkpoint: dict[str, Any], probe_root: Path, probe: dict[str, dict[str, int]],
             statistics: dict[str, dict[str, Any]], model_test: dict[str, Any]) -> str:
    names = checkpoint["class_names"]
    lines = ["# Source bias probes", "", "Written by `python -m training.source_bias` (`make source-bias`).", "",
             f"## 1. The model on another source: `{probe_root}`", "",
             "| true class (probe source) | n | " + " | ".join(f"labelled {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for true, counts in probe.items():
        total = sum(counts.values())
        lines.append(f"| {true} | {total} | " + " | ".join(
            f"{counts[n]} ({counts[n] / max(total, 1):.0%})" for n in names) + " |")
    lines += ["", "## 2. A model that sees only image statistics (grey-level histogram, mean, std, size)", "",
              *table(["test split", "accuracy", "balanced accuracy", "macro AUC", "confusion matrix (rows true)"])]
    for name, scores in statistics.items():
        lines.append(f"| logistic regression on {name} | {scores['accuracy']:.3f} | {scores['balanced_accuracy']:.3f} "
                     f"| {scores['macro_auc']:.3f} | `{scores['confusion_matrix']}` |")
    lines += [f"| the CNN (`cxr4`, sees the image squashed to a square) | {model_test['accuracy']:.3f} | "
              f"{model_test['balanced_accuracy']:.3f} | {model_test['macro_auc']:.3f} | "
              f"`{model_test['confusion_matrix']}` |", "", f"Class order: {', '.join(names)}.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = load_checkpoint(args.checkpoint)
    data_root, probe_root = Path(args.data), Path(args.probe)
    probe = cross_source(checkpoint, probe_root)
    statistics = statistics_only(data_root, checkpoint["class_names"])
    model_test, _, _ = evaluate_checkpoint(checkpoint, data_root, "test", bootstrap=0)
    result = {"probe": probe, "statistics_only": statistics,
              "model": {k: model_test[k] for k in ("accuracy", "balanced_accuracy", "macro_auc")}}
    write_markdown_and_json(args.output, markdown(checkpoint, probe_root, probe, statistics, model_test), result)
    print(json.dumps(result, indent=2))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/cxr4/model.pt")
    parser.add_argument("--data", default=str(data_root() / "multiclass"))
    parser.add_argument("--probe", default=str(data_root() / "pneumonia" / "test"))
    parser.add_argument("--output", default="runs/reports/cxr4/source_bias.md")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
