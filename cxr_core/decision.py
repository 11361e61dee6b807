"""How a model's output becomes an answer, in one place for every backend, training and evaluation: logits
divided by the model's fitted temperature, softmax, then the threshold on p(positive) for a two-class model
(argmax otherwise). Shipped in every archive; the metrics and reports live in `cxr.metrics`."""

from __future__ import annotations

import math

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64, returned as float32: what every backend answers."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature).astype(np.float32)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits), for probabilities recorded before T was known: log-probabilities
    differ from the logits by a constant per row, which softmax ignores."""
    if temperature == 1.0:
        return probabilities
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None))
    return softmax(logits / temperature).astype(np.asarray(probabilities).dtype)


def predict_labels(probabilities: np.ndarray, positive_index: int | None, threshold: float | None) -> np.ndarray:
    """Binary with a threshold: positive when p(positive) >= threshold. Otherwise: argmax."""
    if positive_index is not None and threshold is not None and probabilities.shape[1] == 2:
        negative_index = 1 - positive_index
        return np.where(probabilities[:, positive_index] >= threshold, positive_index, negative_index)
    return probabilities.argmax(axis=1)


def margin_needed(target: int, n_classes: int, positive_index: int | None, threshold: float | None,
                  temperature: float) -> float:
    """The margin over the mean logit that class `target` needs to be the answer. Two classes with a threshold t
    on p(positive) at temperature T: p(positive) >= t exactly when the positive class's margin (half the logit
    difference) reaches T * logit(t) / 2, and the negative class is the answer when its margin exceeds minus that.
    Argmax: 0 (the largest logit is never below the mean)."""
    if positive_index is None or threshold is None or n_classes != 2:
        return 0.0
    t = min(max(float(threshold), 1e-6), 1 - 1e-6)
    positive_margin = temperature * math.log(t / (1 - t)) / 2
    return positive_margin if target == positive_index else -positive_margin
