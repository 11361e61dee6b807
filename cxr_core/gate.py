"""The out-of-distribution gate: is this a frontal chest radiograph at all?

A tiny CNN (about 0.1 M parameters) on a 64x64 thumbnail of the model's own input tensor (so it costs one
average-pool and a few small convolutions next to the classifier's forward pass). It was trained by
`python -m training.fit_gate` on the training X-rays of every dataset under ../shared/data against images
that are not chest X-rays (see `training.not_xrays`); its limit was chosen on the val X-rays. It ships as
its own small checkpoint (`models/gate/ood_gate.pt`) inside every archive, next to the model file.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

GATE_SIZE = 64
GATE_FILE = "ood_gate.pt"


class GateNet(nn.Module):
    """Four strided conv blocks + global pooling -> one logit for "not a chest X-ray"."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 2, 1)

    def forward(self, thumbnails: torch.Tensor) -> torch.Tensor:
        maps = self.features(thumbnails)
        pooled = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)[:, 0]


def gate_input(batch: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(N, 1, 64, 64) pixels in [0, 1] from a normalised model-input batch (any size >= 64, 1 or 3 channels)."""
    pixels = (batch[:, :1].float() * std + mean).clamp_(0.0, 1.0)
    return nn.functional.adaptive_avg_pool2d(pixels, GATE_SIZE)


class OodGate:
    """Loads a gate checkpoint; `scores` gives each image's probability of not being a chest X-ray."""

    def __init__(self, checkpoint: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = GateNet(checkpoint["width"])
        self.net.load_state_dict({k: v.float() for k, v in checkpoint["state_dict"].items()})
        self.net.to(self.device).eval()
        self.limit = float(checkpoint["limit"])
        self.info = {key: checkpoint[key] for key in ("limit", "metrics", "created") if key in checkpoint}

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> OodGate:
        return cls(torch.load(path, map_location="cpu", weights_only=True), device)

    def scores(self, batch: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        """Probability of "not a chest X-ray" for each image of a normalised model-input batch."""
        with torch.inference_mode():
            return torch.sigmoid(self.net(gate_input(batch.to(self.device), mean, std))).cpu()
