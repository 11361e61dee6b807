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


def test_grad_cam_heat_leans_into_the_lung_fields(checkpoint, sample_paths):
    """On the pneumonia samples it calls PNEUMONIA, more heat falls inside the lung fields than a uniform map's."""
    import numpy as np
    import torch

    from cxr.checkpoint import model_from_checkpoint, preprocess_config
    from cxr.explain import grad_cam, lung_heat_fraction, lung_prior
    from cxr.preprocessing import EvalPreset, load_image

    model, preset = model_from_checkpoint(checkpoint), EvalPreset(preprocess_config(checkpoint))
    positive = checkpoint["class_names"].index("PNEUMONIA")
    batch = torch.stack([preset(load_image(path)) for path in sample_paths if path.parent.name == "PNEUMONIA"])
    with torch.no_grad():
        called = torch.softmax(model(batch), dim=1)[:, positive] >= checkpoint["threshold"]
    heatmaps = grad_cam(model, checkpoint["arch"], batch[called], [positive] * int(called.sum()))
    fractions = [lung_heat_fraction(heatmap) for heatmap in heatmaps]
    assert len(fractions) >= 15
    assert np.median(fractions) > 1.2 * lung_prior(heatmaps.shape[-1]).mean()
