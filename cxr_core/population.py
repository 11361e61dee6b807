"""The population check: is this X-ray like the ones the model was trained on?

The gate (cxr_core.gate) refuses what is not a chest X-ray; this check flags chest X-rays from outside the model's
training population (another hospital, another age group, another kind of film), on which a model answers as
confidently as on its own films and is often wrong. It reads the model's own feature maps: the mean and
standard deviation of every channel after each ResNet stage (`TAPS`), standardised (`center`, `scale`), then

  - `logistic`: p(another source) = sigmoid(z . weights + bias), fitted against other sources' training films;
  - `gaussian`: mean squared whitened principal components (a one-class distance, for a model that has no
    other source to be told apart from).

A score above `limit` is outside (`outside`: the one rule, for fitting, reports, export checks and serving).
A check may also narrow one class (`NARROW_KEY`): a class whose boundary was learned on part of the population
only (cxr4's NORMAL vs PNEUMONIA: children) is answered only for films like that part; a second logistic layer
on the same features scores "unlike that part", and when the model's most likely class is the narrowed one, the
film's population score is raised above `limit` where that second score is above its own limit (the fit:
training/narrow_class.py).
`CheckedModel` fuses the check into the model's graph (`forward -> (logits, population)`), so TorchScript,
ONNX, int8 and AOTInductor files carry it as a second output and it costs one pass. The fitted tensors travel
in the checkpoint under `population_check`; the settings (`PopulationSettings`) in the serving config
embedded in every exported file. Fitting: training/fit_population.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_KEY = "population_check"
NARROW_KEY = "narrow_class"  # optional, inside the check: {"class_index", "limit", center, scale, weights, bias}
TAPS = ("layer1", "layer2", "layer3", "layer4")
KINDS = ("logistic", "gaussian")


@dataclass(frozen=True)
class PopulationSettings:
    """What a served model says of its check: the kind, the limit and who the model is for."""

    kind: str
    limit: float
    intended_population: str
    model_card: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def whom(self) -> dict[str, str]:
        """Whom the model is for, as answers and refusals outside the population say it."""
        return {"intended_population": self.intended_population, "model_card": self.model_card}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PopulationSettings | None:
        """The settings from an exported file's config, or from a checkpoint's fitted check (which also holds
        its tensors and fit report); None for a model without a check."""
        if not values:
            return None
        return cls(kind=values["kind"], limit=float(values["limit"]),
                   intended_population=values["intended_population"], model_card=values["model_card"])


def outside(scores: float | np.ndarray, limit: float) -> np.bool_ | np.ndarray:
    """Whether each score is outside the population: above the limit (the limit itself is inside)."""
    return np.asarray(scores) > limit


def channel_statistics(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2C): each channel's spatial mean and standard deviation."""
    mean = feature_map.mean(dim=(2, 3))
    variance = (feature_map - mean[:, :, None, None]).pow(2).mean(dim=(2, 3))
    return torch.cat([mean, variance.clamp_min(0).sqrt()], dim=1)


def resnet_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision ResNet's forward, also returning the statistics of every tapped stage."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    statistics = []
    for name in TAPS:
        x = getattr(model, name)(x)
        statistics.append(channel_statistics(x))
    logits = model.fc(torch.flatten(model.avgpool(x), 1))
    return logits, torch.cat(statistics, dim=1)


def supports(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("conv1", "bn1", "maxpool", "avgpool", "fc", *TAPS))


def population_score(features: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor,
                     bias: torch.Tensor, kind: str) -> torch.Tensor:
    """The score of each row of `features` (higher = further from the population); the one formula used by
    fitting, reports and the served graph."""
    z = (features - center) / scale
    if kind == "logistic":
        return torch.sigmoid(z @ weights + bias)[:, 0]
    return (z @ weights).pow(2).mean(dim=1)


def check_tensors(check: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(check[name], dtype=torch.float32)
            for name in ("center", "scale", "weights", "bias")}


class CheckedModel(nn.Module):
    """The classifier and its population check in one graph: forward -> (logits, population score)."""

    def __init__(self, model: nn.Module, check: dict[str, Any]) -> None:
        super().__init__()
        if not supports(model):
            raise ValueError("the population check taps ResNet stages; this architecture has none")
        if check["kind"] not in KINDS:
            raise ValueError(f"unknown population check kind {check['kind']!r}; known: {', '.join(KINDS)}")
        self.model, self.kind = model, check["kind"]
        for name, tensor in check_tensors(check).items():
            self.register_buffer(name, tensor)
        narrow = check.get(NARROW_KEY)
        self.narrow_class = None if narrow is None else int(narrow["class_index"])
        if narrow is not None:
            for name, tensor in check_tensors(narrow).items():
                self.register_buffer(f"narrow_{name}", tensor)
            self.register_buffer("narrow_limit", torch.tensor(float(narrow["limit"])))
            # moves a narrow score above its limit onto the check's scale: above the check's limit by as much
            self.register_buffer("narrow_shift", torch.tensor(float(check["limit"]) - float(narrow["limit"])))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = resnet_forward(self.model, images)
        return logits, self.check_score(logits, features)

    def check_score(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The population score from the model's logits and feature statistics (also for cached features)."""
        score = population_score(features, self.center, self.scale, self.weights, self.bias, self.kind)
        if self.narrow_class is not None:
            narrow = population_score(features, self.narrow_center, self.narrow_scale, self.narrow_weights,
                                      self.narrow_bias, "logistic")
            refused = (logits.argmax(dim=1) == self.narrow_class) & (narrow > self.narrow_limit)
            score = torch.where(refused, torch.maximum(score, narrow + self.narrow_shift), score)
        return score


def verdict(score: float | None, settings: PopulationSettings | None, mode: str) -> dict[str, Any]:
    """The `population` field of an answer; `mode` is the handler's population_check setting."""
    if settings is None:
        return {"inside": None, "check": "absent"}
    if mode == "off" or score is None:
        return {"inside": None, "check": "off"}
    return {"inside": not outside(score, settings.limit), "score": round(float(score), 4),
            "limit": round(settings.limit, 4), "check": settings.kind}
