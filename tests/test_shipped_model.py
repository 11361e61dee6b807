"""The committed default model: self-describing, small, and its recorded test figures are reproducible."""

import pytest

from cxr.checkpoint import load_checkpoint
from tests.conftest import REPO, SHIPPED_MODEL
from training.evaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(SHIPPED_MODEL)


def test_shipped_model_is_small_and_self_describing(checkpoint):
    assert SHIPPED_MODEL.stat().st_size <= 25 * 1024 * 1024
    assert checkpoint["class_names"] == ["NORMAL", "PNEUMONIA"] and checkpoint["positive_class"] == "PNEUMONIA"
    assert 0.0 < checkpoint["threshold"] < 1.0
    assert checkpoint["preprocessing"]["channels"] == 1
    assert len(checkpoint["data_manifest_sha256"]) == 64 and checkpoint["git_commit"]
    assert checkpoint["train_config"]["arch"] == checkpoint["arch"]
    assert checkpoint["metrics"]["val"]["sensitivity"] >= 0.95  # the recall-first threshold, on val
    assert checkpoint["metrics"]["test"]["n"] == 624


def test_recorded_test_metrics_reproduce(checkpoint, data_root):
    """Evaluating the committed (fp16-stored) weights gives the figures recorded from the fp32 weights."""
    report, _, _ = evaluate_checkpoint(checkpoint, data_root, "test", bootstrap=0)
    recorded = checkpoint["metrics"]["test"]
    assert report["n"] == 624
    assert report["roc_auc"] == pytest.approx(recorded["roc_auc"], abs=1e-3)
    assert report["accuracy"] == pytest.approx(recorded["accuracy"], abs=2 / 624)
    assert report["sensitivity"] == pytest.approx(recorded["sensitivity"], abs=2 / 390)


def test_readme_quotes_the_recorded_test_figures(checkpoint):
    readme = (REPO / "README.md").read_text()
    recorded = checkpoint["metrics"]["test"]
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity"):
        assert f"{recorded[key]:.3f}" in readme, key
