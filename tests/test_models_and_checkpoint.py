"""Architectures adapt to grayscale input and any class count; checkpoints round-trip as plain data."""

import pytest
import torch

from cxr_core.checkpoint import (
    ServingConfig,
    load_checkpoint,
    model_from_checkpoint,
    preprocess_config,
    save_checkpoint,
)
from cxr_core.models import SUPPORTED_ARCHITECTURES, build_model
from cxr_core.preprocessing import PreprocessConfig


@torch.no_grad()
def softmax_of(model, batch):
    return torch.softmax(model.eval()(batch).float(), dim=1)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
@pytest.mark.parametrize(("channels", "classes"), [(1, 2), (3, 4)])
def test_architectures_take_the_input_and_class_count(arch, channels, classes):
    torch.manual_seed(0)
    model = build_model(arch, classes, channels).eval()
    probabilities = softmax_of(model, torch.randn(2, channels, 64, 64))
    assert probabilities.shape == (2, classes)
    assert torch.allclose(probabilities.sum(1), torch.ones(2))


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg_from_mars", 2)


def _save(path, model, half):
    config = ServingConfig(arch="resnet18", class_names=("NORMAL", "PNEUMONIA"), positive_class="PNEUMONIA",
                           threshold=0.42, preprocessing=PreprocessConfig(image_size=64))
    return save_checkpoint(path, model, config, metrics={"val": {"roc_auc": 0.9}}, train_config={"epochs": 1},
                           data_manifest_sha256="abc", epoch=3, half=half)


@pytest.mark.parametrize("half", [False, True])
def test_checkpoint_round_trip(tmp_path, half):
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1).eval()
    path = tmp_path / "model.pt"
    _save(path, model, half)
    checkpoint = load_checkpoint(path)  # weights_only=True inside: no pickled code
    assert checkpoint["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert checkpoint["threshold"] == pytest.approx(0.42)
    assert checkpoint["metrics"]["val"]["roc_auc"] == 0.9
    assert preprocess_config(checkpoint) == PreprocessConfig(image_size=64)
    assert checkpoint["git_commit"]
    restored = model_from_checkpoint(checkpoint)
    batch = torch.randn(3, 1, 64, 64)
    expected, actual = softmax_of(model, batch), softmax_of(restored, batch)
    assert torch.allclose(expected, actual, atol=2e-3 if half else 1e-6)


def test_checkpoint_loads_with_plain_torch_load(tmp_path):
    path = tmp_path / "model.pt"
    _save(path, build_model("resnet18", 2, 1), half=True)
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "resnet18"
    assert all(t.dtype in (torch.float16, torch.int64) for t in raw["state_dict"].values())


def test_unknown_format_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format_version": 99}, path)
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_checkpoint(path)
