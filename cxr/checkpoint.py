"""Checkpoint I/O. A checkpoint carries everything needed to use the model, as plain data.

It is a dict of tensors, strings, numbers, lists and dicts, loadable with `torch.load(weights_only=True)`
(no pickled code, no training globals): architecture, class names, preprocessing, threshold, metrics,
training config, data manifest hash and git commit travel with the weights.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr.decision import predict_labels
from cxr.models import build_model
from cxr.population import PopulationSettings, settings_of
from cxr.preprocessing import PreprocessConfig

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    class_names: list[str],
    preprocessing: PreprocessConfig,
    positive_class: str | None,
    threshold: float | None,
    metrics: dict[str, Any],
    temperature: float = 1.0,
    train_config: dict[str, Any],
    data_manifest_sha256: str,
    epoch: int,
    half: bool = False,
    training_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a self-describing checkpoint; `half=True` stores floating weights as fp16 (halves the size)."""
    state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    if half:
        state_dict = {name: t.half() if t.is_floating_point() else t for name, t in state_dict.items()}
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "positive_class": positive_class,
        "preprocessing": preprocessing.to_dict(),
        "threshold": None if threshold is None else float(threshold),
        "temperature": float(temperature),
        "metrics": metrics,
        "train_config": train_config,
        "data_manifest_sha256": data_manifest_sha256,
        "git_commit": git_commit(),
        "epoch": int(epoch),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "state_dict": state_dict,
    }
    if training_state is not None:
        checkpoint["training_state"] = training_state
    return write_checkpoint(path, checkpoint)


def write_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Atomic write (temporary file + rename), so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(path.suffix + ".tmp")
    torch.save(checkpoint, tmp_path)
    os.replace(tmp_path, path)
    return checkpoint


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`: tensors and plain data only)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {checkpoint.get('format_version')!r}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network in float32 eval mode from a loaded checkpoint."""
    preprocessing = PreprocessConfig.from_dict(checkpoint["preprocessing"])
    model = build_model(checkpoint["arch"], checkpoint["num_classes"], preprocessing.channels)
    state_dict = {name: t.float() if t.is_floating_point() else t for name, t in checkpoint["state_dict"].items()}
    model.load_state_dict(state_dict)
    return model.eval()


def preprocess_config(checkpoint: dict[str, Any]) -> PreprocessConfig:
    return PreprocessConfig.from_dict(checkpoint["preprocessing"])


def git_commit() -> str:
    """The current commit, with "-dirty" when the work tree has changes; "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


# The few figures embedded in exported files (and printed after training and evaluation).
SUMMARY_KEYS = ("roc_auc", "macro_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
SERVING_KEYS = ("arch", "class_names", "positive_class", "threshold", "preprocessing", "data_manifest_sha256",
                "git_commit", "created")


def serving_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a served model needs about itself, as the plain dict embedded in TorchScript and ONNX files so they
    stand alone (`ServingConfig.from_dict` reads it back)."""
    config = {key: checkpoint.get(key) for key in SERVING_KEYS}  # provenance may be absent mid-training
    config["temperature"] = float(checkpoint.get("temperature", 1.0))  # 1.0: checkpoints from before calibration
    config["metrics"] = {
        split: {key: values[key] for key in SUMMARY_KEYS if key in values}
        for split, values in checkpoint.get("metrics", {}).items() if isinstance(values, dict)
    }
    config["population"] = settings_of(checkpoint)  # None: no population check was fitted
    return config


@dataclass(frozen=True)
class ServingConfig:
    """The one typed view of a model's serving config, whichever file it came from: classes, the positive
    class (two-class models; None decides by argmax), threshold, temperature, preprocessing and the
    population check's settings (None when the model has none)."""

    arch: str
    class_names: tuple[str, ...]
    positive_class: str | None
    threshold: float | None
    temperature: float
    preprocessing: PreprocessConfig
    population: PopulationSettings | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ServingConfig:
        return cls(arch=config["arch"], class_names=tuple(config["class_names"]),
                   positive_class=config.get("positive_class"), threshold=config.get("threshold"),
                   temperature=float(config.get("temperature", 1.0)),
                   preprocessing=PreprocessConfig.from_dict(config["preprocessing"]),
                   population=PopulationSettings.from_dict(config.get("population")))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> ServingConfig:
        return cls.from_dict(serving_config(checkpoint))

    @property
    def positive_index(self) -> int | None:
        return self.class_names.index(self.positive_class) if self.positive_class is not None else None

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices: p(positive) >= threshold for a two-class model with a threshold, else argmax."""
        return predict_labels(probabilities, self.positive_index, self.threshold)
