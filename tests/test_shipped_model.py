"""The committed default model: self-describing, small, and its recorded test figures are reproducible."""

import pytest

from cxr_core.checkpoint import load_checkpoint
from tests.conftest import REPO, SHIPPED_MODEL
from training.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.slow


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


def test_recorded_test_metrics_reproduce(checkpoint, pneumonia_data):
    """Evaluating the committed (fp16-stored) weights gives the figures recorded from the fp32 weights."""
    report, _, _ = evaluate_checkpoint(checkpoint, pneumonia_data, "test", bootstrap=0)
    recorded = checkpoint["metrics"]["test"]
    assert report["n"] == 624
    assert report["roc_auc"] == pytest.approx(recorded["roc_auc"], abs=1e-3)
    assert report["accuracy"] == pytest.approx(recorded["accuracy"], abs=2 / 624)
    assert report["sensitivity"] == pytest.approx(recorded["sensitivity"], abs=2 / 390)


def test_grad_cam_heat_leans_into_the_lung_fields(checkpoint, real_samples):
    """On the pneumonia samples it calls PNEUMONIA, more heat falls inside the lung fields than a uniform map's."""
    import numpy as np
    import torch

    from cxr.explain import lung_heat_fraction, lung_prior
    from cxr_core.checkpoint import ServingConfig, model_from_checkpoint, preprocess_config
    from cxr_core.decision import calibrated_probabilities
    from cxr_core.explain import grad_cam
    from cxr_core.preprocessing import EvalPreset, load_image

    model, preset = model_from_checkpoint(checkpoint), EvalPreset(preprocess_config(checkpoint))
    positive = checkpoint["class_names"].index("PNEUMONIA")
    batch = torch.stack([preset(load_image(path)) for path in real_samples if path.parent.name == "PNEUMONIA"])
    served = ServingConfig.from_checkpoint(checkpoint)
    with torch.no_grad():
        logits = model(batch).numpy()
    called = torch.as_tensor(served.decide(calibrated_probabilities(logits, served.temperature)) == positive)
    needed = [served.margin_needed(positive)] * int(called.sum())
    heatmaps = grad_cam(model, checkpoint["arch"], batch[called], [positive] * int(called.sum()), needed)
    fractions = [lung_heat_fraction(heatmap) for heatmap in heatmaps]
    assert len(fractions) >= 15
    assert np.median(fractions) > 1.2 * lung_prior(heatmaps.shape[-1]).mean()


CXR4_MODEL = REPO / "models" / "cxr4" / "model.pt"


@pytest.fixture(scope="module")
def cxr4():
    if not CXR4_MODEL.is_file():
        pytest.skip(f"no 4-class model at {CXR4_MODEL}")
    return load_checkpoint(CXR4_MODEL)


def test_cxr4_is_small_calibrated_and_self_describing(cxr4):
    assert CXR4_MODEL.stat().st_size <= 25 * 1024 * 1024
    assert sorted(cxr4["class_names"]) == ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    assert cxr4["positive_class"] is None and cxr4["threshold"] is None  # argmax over 4 classes
    assert cxr4["temperature"] > 0 and cxr4["metrics"]["test"]["n"] == 795
    assert set(cxr4["metrics"]["test"]) >= {"macro_auc", "balanced_accuracy", "ece", "brier"}


def test_cxr4_recorded_test_metrics_reproduce(cxr4, multiclass_data):
    report, _, _ = evaluate_checkpoint(cxr4, multiclass_data, "test", bootstrap=0)
    recorded = cxr4["metrics"]["test"]
    assert report["macro_auc"] == pytest.approx(recorded["macro_auc"], abs=1e-3)
    assert report["balanced_accuracy"] == pytest.approx(recorded["balanced_accuracy"], abs=2 / 795)
    assert set(report["per_class"]["TUBERCULOSIS"]) >= {"sensitivity", "specificity", "precision", "f1", "auc"}
