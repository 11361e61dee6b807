"""The shipped adult model (made by `make model` on rsna/): self-describing, population-checked, and its recorded
test figures reproduce; its check tells the Kermany children apart."""

import pytest

from cxr_core.checkpoint import load_checkpoint
from tests.conftest import REPO, required_dataset
from training.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.slow

ADULT_MODEL = REPO / "models" / "adult" / "model.pt"


@pytest.fixture(scope="module")
def adult():
    return load_checkpoint(ADULT_MODEL)


def test_adult_model_is_small_calibrated_and_checked(adult):
    assert ADULT_MODEL.stat().st_size <= 25 * 1024 * 1024
    assert adult["class_names"] == ["NO_OPACITY", "OPACITY"] and adult["positive_class"] == "OPACITY"
    assert 0.0 < adult["threshold"] < 1.0 and adult["temperature"] > 0
    check = adult["population_check"]
    assert check["intended_population"].startswith("Adult") and check["limit"] > 0
    assert adult["metrics"]["test"]["n"] == 280 and adult["metrics"]["val"]["sensitivity"] >= 0.95
    assert adult["train_config"]["init"] in ("models/pneumonia/model.pt", "models/cxr4/model.pt")


def test_adult_recorded_test_metrics_reproduce(adult):
    rsna = required_dataset("rsna")
    report, _, _ = evaluate_checkpoint(adult, rsna, "test", bootstrap=0)
    recorded = adult["metrics"]["test"]
    assert report["n"] == 280
    assert report["roc_auc"] == pytest.approx(recorded["roc_auc"], abs=1e-3)
    assert report["sensitivity"] == pytest.approx(recorded["sensitivity"], abs=2 / 68)
