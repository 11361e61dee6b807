"""Grad-CAM draws the evidence for the answer above what the answer needs: per-cell margins whose mean is the
film's margin, the served threshold's margin as the floor, and never a blank map for the class answered."""

import numpy as np
import pytest
import torch

from cxr_core.decision import calibrated_probabilities, margin_needed, predict_labels
from cxr_core.explain import evidence_maps, grad_cam
from cxr_core.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet18", 2, 1).eval()


def test_the_evidence_map_is_the_margins_class_activation_map(model):
    """For a ResNet (average pool + linear layer) each cell's evidence is the margin's weights applied to that
    cell's features plus the margin's bias; the mean over cells is the film's margin."""
    batch = torch.randn(3, 1, 64, 64)
    evidence = evidence_maps(model, "resnet18", batch, [1, 0, 1])
    features = {}
    hook = model.layer4.register_forward_hook(lambda module, inputs, output: features.__setitem__("maps", output))
    with torch.no_grad():
        logits = model(batch)
    hook.remove()
    weights, bias = model.fc.weight - model.fc.weight.mean(0), model.fc.bias - model.fc.bias.mean()
    for row, target in enumerate([1, 0, 1]):
        expected = torch.einsum("c,chw->hw", weights[target], features["maps"][row]) + bias[target]
        assert torch.allclose(evidence[row], expected, atol=1e-4)
        margin = logits[row, target] - logits[row].mean()
        assert float(evidence[row].mean()) == pytest.approx(float(margin), abs=1e-4)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_the_needed_margin_is_where_the_decision_turns(threshold, temperature):
    """A film is answered with a class exactly when that class's margin over the mean logit reaches the margin
    it needs: for two classes with a threshold, at both classes; for argmax, at zero."""
    logits = np.random.default_rng(1).normal(0, 3, size=(2000, 2))
    labels = predict_labels(calibrated_probabilities(logits, temperature), 1, threshold)
    margins = logits - logits.mean(axis=1, keepdims=True)
    for target in (0, 1):
        needed = margin_needed(target, 2, 1, threshold, temperature)
        clear = np.abs(margins[:, target] - needed) > 1e-6
        assert np.array_equal((labels == target)[clear], (margins[:, target] >= needed)[clear])
    assert margin_needed(1, 4, None, None, 1.0) == 0.0 and margin_needed(0, 2, None, None, 1.5) == 0.0


def test_an_answered_class_never_gets_a_blank_map(model):
    """Every cell argues against the positive class (its weights negative on post-ReLU features) but its bias
    carries the film over a low threshold: the map drawn against zero minus the bias was blank; drawn against
    the threshold's margin it has a peak. Drawn against a margin far above the film's, no cell clears it."""
    torch.manual_seed(2)
    positive = build_model("resnet18", 2, 1).eval()
    with torch.no_grad():
        positive.fc.weight.copy_(torch.stack([torch.full((512,), 0.01), torch.full((512,), -0.01)]))
        positive.fc.bias.copy_(torch.tensor([-3.0, 3.0]))
    batch = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits = positive(batch).numpy()
    threshold = 0.1
    assert (predict_labels(calibrated_probabilities(logits, 1.0), 1, threshold) == 1).all()
    needed = margin_needed(1, 2, 1, threshold, 1.0)
    heatmaps = grad_cam(positive, "resnet18", batch, [1, 1], [needed, needed])
    assert heatmaps.shape == (2, 64, 64) and np.allclose(heatmaps.max(axis=(1, 2)), 1.0)
    assert (heatmaps >= 0).all()
    against_far_margin = grad_cam(positive, "resnet18", batch, [1, 1], [50.0, 50.0])
    assert np.allclose(against_far_margin, 0.0)
