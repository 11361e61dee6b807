"""Classification metrics in plain NumPy (checked against scikit-learn in the tests) and threshold choice."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxr_core.decision import apply_temperature, predict_labels

# What a checkpoint records about each split it was scored on (training/calibrate.py).
HEADLINE_KEYS = ("n", "roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "precision", "f1",
                 "balanced_accuracy", "macro_auc", "confusion_matrix", "ci95", "threshold")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(values)]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when only one class is present."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(y_true.sum()), int((~y_true).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[y_true].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def _cumulative_counts(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct score, scanning from the highest score down."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_true = scores[order], y_true[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_true)[last_of_run]
    false_positives = (last_of_run + 1) - true_positives
    return true_positives, false_positives, sorted_scores[last_of_run]


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds, starting at (0, 0)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    true_positives, false_positives, thresholds = _cumulative_counts(y_true, scores)
    tpr = np.r_[0.0, true_positives / max(int(y_true.sum()), 1)]
    fpr = np.r_[0.0, false_positives / max(int((~y_true).sum()), 1)]
    return fpr, tpr, np.r_[np.inf, thresholds]


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum (scikit-learn's average_precision_score)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not y_true.any():
        return float("nan")
    true_positives, false_positives, _ = _cumulative_counts(y_true, scores)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / y_true.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, min_sensitivity: float = 0.95) -> float:
    """Recall first: the highest threshold whose sensitivity (predict positive when score >= t) is >= target."""
    positive_scores = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(y_true).astype(bool)])[::-1]
    if len(positive_scores) == 0:
        raise ValueError("cannot choose a threshold without positive examples")
    needed = math.ceil(min_sensitivity * len(positive_scores) - 1e-9)
    return float(positive_scores[max(needed, 1) - 1])


def between_scores(scores: np.ndarray, threshold: float) -> float:
    """The midpoint between `threshold` (one of `scores`) and the next lower score: the same decisions on these
    scores, with no film sitting on the threshold, where the last bits of another runtime could flip it."""
    lower = np.asarray(scores, dtype=np.float64)
    lower = lower[lower < threshold]
    return float((threshold + lower.max()) / 2) if len(lower) else float(threshold)


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the highest sensitivity + specificity - 1 (predict positive when score >= t)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.all() or not y_true.any():
        raise ValueError("cannot choose a threshold without both classes")
    candidates = np.unique(scores)
    index = [(scores[y_true] >= t).mean() - (scores[~y_true] >= t).mean() for t in candidates]
    return float(candidates[int(np.argmax(index))])


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def _safe_divide(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def per_class_metrics(matrix: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float]]:
    """One-vs-rest sensitivity, specificity, precision and F1 for each class of a confusion matrix."""
    total = matrix.sum()
    result = {}
    for index, name in enumerate(class_names):
        tp = matrix[index, index]
        fn = matrix[index].sum() - tp
        fp = matrix[:, index].sum() - tp
        tn = total - tp - fn - fp
        precision = _safe_divide(tp, tp + fp)
        sensitivity = _safe_divide(tp, tp + fn)
        result[name] = {
            "support": int(tp + fn),
            "sensitivity": sensitivity,
            "specificity": _safe_divide(tn, tn + fp),
            "precision": precision,
            "f1": _safe_divide(2 * tp, 2 * tp + fp + fn),
        }
    return result


def _point_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str], positive_index: int | None,
    threshold: float | None,
) -> dict[str, Any]:
    num_classes = len(class_names)
    y_pred = predict_labels(probabilities, positive_index, threshold)
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    per_class = per_class_metrics(matrix, class_names)
    for index, name in enumerate(class_names):
        per_class[name]["auc"] = roc_auc(y_true == index, probabilities[:, index])
    metrics: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(np.nanmean([per_class[name]["sensitivity"] for name in class_names])),
        "macro_auc": float(np.nanmean([per_class[name]["auc"] for name in class_names])),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }
    if positive_index is not None:
        positive = per_class[class_names[positive_index]]
        is_positive = y_true == positive_index
        metrics.update(
            sensitivity=positive["sensitivity"],
            specificity=positive["specificity"],
            precision=positive["precision"],
            f1=positive["f1"],
            roc_auc=roc_auc(is_positive, probabilities[:, positive_index]),
            pr_auc=average_precision(is_positive, probabilities[:, positive_index]),
        )
    return metrics


BOOTSTRAP_KEYS = ("accuracy", "balanced_accuracy", "macro_auc", "sensitivity", "specificity", "f1", "roc_auc")


def classification_report(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    *,
    positive_index: int | None = None,
    threshold: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics for one split, with bootstrap 95% intervals (percentile method) for the headline ones."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    metrics = _point_metrics(y_true, probabilities, class_names, positive_index, threshold)
    metrics["threshold"] = threshold
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {key: [] for key in BOOTSTRAP_KEYS if key in metrics}
        for _ in range(bootstrap):
            index = rng.integers(0, len(y_true), len(y_true))
            resampled = _point_metrics(y_true[index], probabilities[index], class_names, positive_index, threshold)
            for key in samples:
                samples[key].append(resampled[key])
        metrics["ci95"] = {
            key: [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]
            for key, values in samples.items()
        }
    return metrics


def negative_log_likelihood(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    picked = np.asarray(probabilities, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.log(np.clip(picked, 1e-300, None)).mean())


def fit_temperature(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T in [0.05, 20] minimising NLL, by golden-section search on
    log T (NLL is unimodal in T). Changes no argmax; with two classes no ranking either (AUC unchanged)."""
    def loss(log_t: float) -> float:
        return negative_log_likelihood(y_true, apply_temperature(probabilities, float(np.exp(log_t))))

    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(60):
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return float(np.exp((low + high) / 2))


def reliability_bins(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Top-label confidence vs accuracy in equal-width confidence bins (empty bins left out)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)
    correct = predicted == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"low": float(edges[k]), "high": float(edges[k + 1]), "n": int((which == k).sum()),
             "confidence": float(confidence[which == k].mean()), "accuracy": float(correct[which == k].mean())}
            for k in range(bins) if (which == k).any()]


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE: the bin-size-weighted mean |accuracy - confidence| of the top label."""
    rows = reliability_bins(y_true, probabilities, bins)
    total = sum(row["n"] for row in rows)
    return float(sum(row["n"] * abs(row["accuracy"] - row["confidence"]) for row in rows) / max(total, 1))


def brier_score(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean over images of the squared distance between the probability vector and the one-hot truth."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    one_hot = np.eye(probabilities.shape[1])[np.asarray(y_true)]
    return float(((probabilities - one_hot) ** 2).sum(axis=1).mean())
