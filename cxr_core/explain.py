"""Grad-CAM for the eager model: where the network found evidence for a class.

The explained score is the class's margin over the mean logit, not its logit alone: softmax (and so every answer)
depends only on the differences between logits, and evidence that raises every logit alike explains no class.
For a two-class model that is half the logit difference; for a torchvision ResNet (average pool + linear layer)
the heatmap is that margin's class activation map, the map the box-guided training (training.fine_tune) shapes.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image
from torch import nn

# The last convolutional stage of each architecture (its output feeds the pooling + classifier).
CAM_LAYERS = {"resnet18": "layer4", "resnet34": "layer4", "mobilenet_v3_large": "features",
              "efficientnet_b0": "features", "densenet121": "features"}


def grad_cam(model: nn.Module, arch: str, batch: torch.Tensor, targets: list[int]) -> np.ndarray:
    """(N, H, W) heatmaps in [0, 1] at the input resolution, one per image, for class `targets[i]`."""
    layer = model.get_submodule(CAM_LAYERS[arch])
    captured: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.__setitem__("maps", output))
    try:
        with torch.enable_grad():
            logits = model(batch)
            margins = logits - logits.mean(dim=1, keepdim=True)
            chosen = margins[torch.arange(len(targets)), torch.as_tensor(targets)].sum()
            gradients = torch.autograd.grad(chosen, captured["maps"])[0]
    finally:
        hook.remove()
    maps = captured["maps"].detach()
    cam = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True))
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
