"""Temperature scaling fitted on val, the recall-first threshold re-chosen on the calibrated probabilities.

    python -m training.calibrate --checkpoint models/pneumonia/model.pt --output runs/calibrate/model.pt

Writes a copy of the checkpoint with its `temperature`, `threshold` and recorded metrics set (the weights are
not touched; the input file is never rewritten) and writes `calibration.md`, `calibration.json` and
reliability diagrams (val and test, before and after) to --report-dir. Temperature scaling changes no argmax,
and in a 2-class model no ranking: AUC and the decisions at the re-chosen (equivalent) threshold stay as they
were, the probabilities become honest. With more than two classes the argmax decisions stay and one-vs-rest
AUCs can move slightly.
`training.train` runs the same step on its own model.pt.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr.commands import command_parser
from cxr.data import resolve_data_root
from cxr.metrics import (
    HEADLINE_KEYS,
    between_scores,
    brier_score,
    choose_threshold,
    classification_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    youden_threshold,
)
from cxr.report import figure, table
from cxr_core.checkpoint import ServingConfig, load_checkpoint, write_checkpoint
from cxr_core.decision import apply_temperature
from training.evaluate import evaluate_checkpoint


def calibration_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {"ece": expected_calibration_error(labels, probabilities), "brier": brier_score(labels, probabilities),
            "nll": negative_log_likelihood(labels, probabilities)}


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Reliability diagram: accuracy against confidence per bin, one line per curve (e.g. before/after)."""
    with figure(path, figsize=(4.8, 4.4)) as axes:
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        for name, (labels, probabilities) in curves.items():
            rows = reliability_bins(labels, probabilities)
            ece = expected_calibration_error(labels, probabilities)
            axes.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                      label=f"{name} (ECE {ece:.3f})")
        axes.set(xlabel="confidence of the predicted class", ylabel="accuracy", title=title, xlim=(0, 1.02),
                 ylim=(0, 1.02))
        axes.legend(loc="upper left", fontsize=8)


@dataclass(frozen=True)
class Calibration:
    """What calibration decided for a checkpoint: the caller applies it (`apply`), the input stays as it was.

    `metrics` holds, per split, the headline figures on the calibrated probabilities; `report` the before/after
    calibration scores written to calibration.md; `scored` per split the full classification report with the
    labels and calibrated probabilities it came from."""
    temperature: float
    threshold: float | None
    metrics: dict[str, Any]
    report: dict[str, Any]
    scored: dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray]]

    def apply(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A copy of `checkpoint` with this temperature, threshold and metrics."""
        return {**checkpoint, "temperature": self.temperature, "threshold": self.threshold,
                "metrics": {**(checkpoint.get("metrics") or {}), **self.metrics}}


def calibrate(checkpoint: dict[str, Any], data_root: Path, *, min_sensitivity: float, workers: int = 1,
              report_dir: Path | None = None, splits: tuple[str, ...] = ("val", "test"),
              rule: str = "recall") -> Calibration:
    """Fit the temperature on val, re-choose the threshold on calibrated val (`rule`: recall, the highest
    threshold keeping `min_sensitivity`; or youden, the highest sensitivity + specificity), score every split
    before and after. Reads `checkpoint` without changing it."""
    uncalibrated = {**checkpoint, "temperature": 1.0}
    raw = {}
    for split in splits:
        if (data_root / split).is_dir():
            _, labels, probabilities = evaluate_checkpoint(uncalibrated, data_root, split, workers=workers,
                                                           bootstrap=0)
            raw[split] = (labels, probabilities)
    temperature = fit_temperature(*raw["val"])
    positive = ServingConfig.from_checkpoint(checkpoint).positive_index
    threshold = checkpoint.get("threshold")
    if positive is not None:
        labels, probabilities = raw["val"]
        calibrated = apply_temperature(probabilities, temperature)
        chosen = choose_threshold(labels == positive, calibrated[:, positive], min_sensitivity) \
            if rule == "recall" else youden_threshold(labels == positive, calibrated[:, positive])
        threshold = between_scores(calibrated[:, positive], chosen)
    report: dict[str, Any] = {"temperature": temperature, "threshold": threshold,
                              "rule": f"recall >= {min_sensitivity} on val" if rule == "recall" else "Youden on val"}
    metrics, scored_splits = {}, {}
    for split, (labels, probabilities) in raw.items():
        calibrated = apply_temperature(probabilities, temperature)
        report[split] = {"before": calibration_scores(labels, probabilities),
                         "after": calibration_scores(labels, calibrated)}
        scored = classification_report(labels, calibrated, checkpoint["class_names"], positive_index=positive,
                                       threshold=threshold)
        metrics[split] = {**{key: scored[key] for key in HEADLINE_KEYS if key in scored}, **report[split]["after"]}
        scored_splits[split] = (scored, labels, calibrated)
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            plot_reliability({"before": (labels, probabilities), f"after (T={temperature:.2f})": (labels, calibrated)},
                             report_dir / f"reliability_{split}.png", f"Reliability - {split}")
    if report_dir is not None:
        (report_dir / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
        (report_dir / "calibration.md").write_text(markdown(report))
    return Calibration(temperature, threshold, metrics, report, scored_splits)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Calibration", "",
             f"Temperature scaling fitted on val: **T = {report['temperature']:.3f}** (probabilities are "
             "softmax(logits / T)). "
             + (f"Threshold re-chosen on the calibrated val probabilities ({report.get('rule', 'recall-first')}): "
                f"{report['threshold']:.4f}."
                if report.get("threshold") is not None else "Argmax decisions (no threshold)."), "",
             *table(["split", "ECE before", "ECE after", "Brier before", "Brier after", "NLL before", "NLL after"])]
    for split in ("val", "test"):
        if split in report:
            before, after = report[split]["before"], report[split]["after"]
            lines.append(f"| {split} | {before['ece']:.4f} | {after['ece']:.4f} | {before['brier']:.4f} | "
                         f"{after['brier']:.4f} | {before['nll']:.4f} | {after['nll']:.4f} |")
    lines += ["", "ECE: 15 equal-width bins of top-label confidence. Brier: mean squared distance to the one-hot "
              "truth, summed over classes.", "",
              "![val](reliability_val.png) ![test](reliability_test.png)", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = load_checkpoint(args.checkpoint)
    data_root = resolve_data_root(args.data)
    min_sensitivity = args.min_sensitivity or checkpoint.get("train_config", {}).get("min_sensitivity", 0.95)
    calibration = calibrate(checkpoint, data_root, min_sensitivity=min_sensitivity, workers=args.workers,
                            report_dir=Path(args.report_dir) if args.report_dir else None)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(args.output, calibration.apply(checkpoint))
    print(json.dumps(calibration.report, indent=2))
    print(f"calibrated checkpoint: {args.output} (the input {args.checkpoint} is unchanged)")
    return calibration.report


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt", help="read, never rewritten")
    parser.add_argument("--output", default="runs/calibrate/model.pt", help="the calibrated checkpoint")
    parser.add_argument("--data", default=None, help="ImageFolder root (default: $CXR_DATA/pneumonia)")
    parser.add_argument("--report-dir", default="runs/calibrate", help="where calibration.md and the diagrams go")
    parser.add_argument("--min-sensitivity", type=float, default=None,
                        help="recall-first target on val (default: the one the model was trained with)")
    parser.add_argument("--workers", type=int, default=1)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
