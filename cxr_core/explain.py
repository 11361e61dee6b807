"""Grad-CAM for the eager model: where the network found evidence for the answer.

The explained score is the class's margin over the mean logit, not its logit alone: softmax (and so every answer)
depends only on the differences between logits, and evidence that raises every logit alike explains no class.
For a two-class model that is half the logit difference; for a torchvision ResNet (average pool + linear layer)
the evidence map (one margin per cell, their mean the film's margin) is that margin's class activation map, the
map the box-guided training (training.fine_tune) shapes. The heatmap is the part of the evidence above the margin
the class needs to be the answer (`ServingConfig.margin_needed`: the served threshold's, for a two-class model):
a film answered with a class always has a cell above it, so an answer never comes with a blank map.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

# The last convolutional stage of each architecture (its output feeds the pooling + classifier).
CAM_LAYERS = {"resnet18": "layer4", "resnet34": "layer4", "mobilenet_v3_large": "features",
              "efficientnet_b0": "features", "densenet121": "features"}


def evidence_maps(model: nn.Module, arch: str, batch: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """(N, h, w) margins of class `targets[i]` per cell of the last convolutional stage: the gradient-weighted
    activations shifted so that each map's mean is the image's margin (exact for a linear head)."""
    layer = model.get_submodule(CAM_LAYERS[arch])
    captured: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.__setitem__("maps", output))
    try:
        with torch.enable_grad():
            logits = model(batch)
            margins = (logits - logits.mean(dim=1, keepdim=True))[torch.arange(len(targets)), torch.as_tensor(targets)]
            gradients = torch.autograd.grad(margins.sum(), captured["maps"])[0]
    finally:
        hook.remove()
    maps = captured["maps"].detach()
    cells = maps.shape[-2] * maps.shape[-1]
    cam = (gradients.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1) * cells
    return cam - cam.mean(dim=(1, 2), keepdim=True) + margins.detach()[:, None, None]


def grad_cam(model: nn.Module, arch: str, batch: torch.Tensor, targets: Sequence[int],
             needed: Sequence[float] | None = None) -> np.ndarray:
    """(N, H, W) heatmaps in [0, 1] at the input resolution, one per image, for class `targets[i]`: the evidence
    above `needed[i]` (the margin that class needs to be the answer; 0 when not given), scaled to its peak."""
    evidence = evidence_maps(model, arch, batch, targets)
    floor = torch.as_tensor(needed if needed is not None else [0.0] * len(targets), dtype=evidence.dtype,
                            device=evidence.device)[:, None, None]
    cam = torch.relu(evidence - floor)[:, None]
    cam = nn.functional.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu().numpy()


def model_view(tensor: torch.Tensor, mean: float, std: float) -> np.ndarray:
    """The 8-bit grayscale image the model saw: its normalised input tensor mapped back to pixels."""
    return np.clip((tensor[0].detach().cpu().numpy() * std + mean) * 255.0, 0, 255).round().astype(np.uint8)


def overlay_png(gray: np.ndarray, heatmap: np.ndarray, size: int = 256, opacity: float = 0.5) -> str:
    """Base64 PNG of the heatmap (black-red-yellow-white) blended over the grayscale image the model saw."""
    base = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
    heat = np.asarray(Image.fromarray((heatmap * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                      dtype=np.float64) / 255.0
    colour = np.stack([np.clip(3 * heat, 0, 1), np.clip(3 * heat - 1, 0, 1), np.clip(3 * heat - 2, 0, 1)], -1)
    alpha = opacity * heat[..., None]
    blended = (1 - alpha) * base[..., None] + alpha * colour
    buffer = io.BytesIO()
    Image.fromarray((blended * 255).round().astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
