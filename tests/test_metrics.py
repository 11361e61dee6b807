"""Our NumPy metrics agree with scikit-learn; the threshold is the highest that keeps sensitivity."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr.metrics import (
    average_precision,
    between_scores,
    brier_score,
    choose_threshold,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    roc_auc,
    roc_curve,
    youden_threshold,
)
from cxr.report import write_markdown_and_json
from cxr_core.decision import apply_temperature, softmax


@pytest.fixture
def binary_scores():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    scores = np.round(np.clip(0.35 * y + rng.normal(0.4, 0.25, 400), 0, 1), 2)  # rounded: many ties
    return y, scores


def test_roc_auc_and_average_precision_match_sklearn(binary_scores):
    y, scores = binary_scores
    assert roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)
    assert average_precision(y, scores) == pytest.approx(skm.average_precision_score(y, scores), abs=1e-12)


def test_roc_curve_matches_sklearn(binary_scores):
    y, scores = binary_scores
    fpr, tpr, _ = roc_curve(y, scores)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, scores, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)


def test_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_binary_report_matches_sklearn(binary_scores):
    y, scores = binary_scores
    probabilities = np.stack([1 - scores, scores], axis=1)
    report = classification_report(y, probabilities, ["NORMAL", "PNEUMONIA"], positive_index=1, threshold=0.5,
                                   bootstrap=200)
    predicted = (scores >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, predicted).ravel()
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert report["sensitivity"] == pytest.approx(skm.recall_score(y, predicted))
    assert report["specificity"] == pytest.approx(tn / (tn + fp))
    assert report["precision"] == pytest.approx(skm.precision_score(y, predicted))
    assert report["f1"] == pytest.approx(skm.f1_score(y, predicted))
    assert report["roc_auc"] == pytest.approx(skm.roc_auc_score(y, scores))
    assert report["pr_auc"] == pytest.approx(skm.average_precision_score(y, scores))
    assert report["confusion_matrix"] == [[tn, fp], [fn, tp]]
    low, high = report["ci95"]["roc_auc"]
    assert low < report["roc_auc"] < high


def test_multiclass_report_matches_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    report = classification_report(y, probabilities, names, bootstrap=0)
    predicted = probabilities.argmax(1)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, predicted))
    assert report["macro_auc"] == pytest.approx(skm.roc_auc_score(y, probabilities, multi_class="ovr"))
    f1 = skm.f1_score(y, predicted, average=None)
    precision = skm.precision_score(y, predicted, average=None)
    for index, name in enumerate(names):
        assert report["per_class"][name]["f1"] == pytest.approx(f1[index])
        assert report["per_class"][name]["precision"] == pytest.approx(precision[index])
    assert "sensitivity" not in report  # no single disease class for more than 2 classes


@pytest.mark.parametrize("target", [0.9, 0.95, 1.0])
def test_choose_threshold_is_the_highest_meeting_the_target(binary_scores, target):
    y, scores = binary_scores
    threshold = choose_threshold(y, scores, target)
    positives = scores[y == 1]
    assert (positives >= threshold).mean() >= target
    higher = np.unique(scores[scores > threshold])
    if len(higher):
        assert (positives >= higher[0]).mean() < target


def test_choose_threshold_needs_positives():
    with pytest.raises(ValueError):
        choose_threshold(np.zeros(5), np.linspace(0, 1, 5))


def _overconfident(temperature: float, n: int = 4000, classes: int = 3, seed: int = 0):
    """Labels drawn from softmax(z); the 'model' reports softmax(z * temperature) (overconfident for T > 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, classes))
    true_probabilities = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in true_probabilities])
    return labels, true_probabilities, softmax(logits * temperature)


def test_fit_temperature_recovers_a_known_overconfidence():
    labels, _, reported = _overconfident(3.0)
    assert fit_temperature(labels, reported) == pytest.approx(3.0, rel=0.1)
    labels, _, honest = _overconfident(1.0, seed=1)
    assert fit_temperature(labels, honest) == pytest.approx(1.0, rel=0.1)


def test_temperature_keeps_rankings_and_improves_calibration():
    labels, _, reported = _overconfident(3.0)
    temperature = fit_temperature(labels, reported)
    calibrated = apply_temperature(reported, temperature)
    assert np.array_equal(calibrated.argmax(axis=1), reported.argmax(axis=1))
    binary_labels, _, binary = _overconfident(3.0, classes=2)
    scaled = apply_temperature(binary, 2.0)  # two classes: the ranking (so the AUC) cannot change
    assert roc_auc(binary_labels == 1, scaled[:, 1]) == pytest.approx(roc_auc(binary_labels == 1, binary[:, 1]))
    assert expected_calibration_error(labels, calibrated) < 0.5 * expected_calibration_error(labels, reported)
    assert brier_score(labels, calibrated) < brier_score(labels, reported)
    assert negative_log_likelihood(labels, calibrated) < negative_log_likelihood(labels, reported)
    assert apply_temperature(reported, 1.0) is reported


def test_brier_and_ece_match_their_definitions():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    p = rng.random(500)
    labels = (rng.random(500) < p).astype(int)
    probabilities = np.stack([1 - p, p], axis=1)
    # Our Brier sums over both classes: twice scikit-learn's binary Brier.
    assert brier_score(labels, probabilities) == pytest.approx(2 * brier_score_loss(labels, p))
    confident = np.array([[0.9, 0.1]] * 10)
    assert expected_calibration_error(np.array([0] * 9 + [1]), confident) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(np.array([0] * 5 + [1] * 5), confident) == pytest.approx(0.4)


def test_a_chosen_threshold_sits_between_scores():
    """No val film sits exactly on the served threshold, where another runtime's last bits could flip it."""
    scores = np.array([0.1, 0.3, 0.3, 0.7])
    threshold = between_scores(scores, 0.3)
    assert threshold == pytest.approx(0.2) and ((scores >= threshold) == (scores >= 0.3)).all()
    assert between_scores(scores, 0.1) == 0.1  # nothing lower: the threshold stays
    y = np.array([0, 1, 0, 1])
    assert youden_threshold(y, scores) == 0.3


def test_a_report_and_its_data_land_side_by_side(tmp_path):
    """The Markdown at the path asked for (folders made), the data beside it as JSON, numpy numbers as floats."""
    import json

    written = write_markdown_and_json(tmp_path / "deep" / "report.md", "# title\n", {"auc": np.float32(0.5), "n": 3})
    assert written == tmp_path / "deep" / "report.md" and written.read_text() == "# title\n"
    assert json.loads((tmp_path / "deep" / "report.json").read_text()) == {"auc": 0.5, "n": 3}
