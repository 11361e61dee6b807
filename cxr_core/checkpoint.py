"""Checkpoint I/O. A checkpoint carries everything needed to use the model, as plain data.

It is a dict of tensors, strings, numbers, lists and dicts, loadable with `torch.load(weights_only=True)`
(no pickled code, no training globals): architecture, class names, preprocessing, threshold, metrics,
training config, data manifest hash and git commit travel with the weights.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr_core.decision import margin_needed, predict_labels
from cxr_core.models import build_model
from cxr_core.population import CHECKPOINT_KEY, PopulationSettings
from cxr_core.preprocessing import PreprocessConfig

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: ServingConfig,
    *,
    metrics: dict[str, Any],
    train_config: dict[str, Any],
    data_manifest_sha256: str,
    epoch: int,
    half: bool = False,
    training_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a self-describing checkpoint: the weights, the serving config's fields as top-level keys, metrics
    and provenance; `half=True` stores floating weights as fp16 (halves the size). A population check is added
    by its fitting (training/fit_population.py), tensors and all, under `population_check`."""
    state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    if half:
        state_dict = {name: t.half() if t.is_floating_point() else t for name, t in state_dict.items()}
    served = config.to_dict()
    served.pop("population")
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "num_classes": len(config.class_names),
        **served,
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
PROVENANCE_KEYS = ("data_manifest_sha256", "git_commit", "created")


@dataclass(frozen=True)
class ServingConfig:
    """Everything a served model needs about itself, whichever file it came from: classes, the positive class
    (two-class models; None decides by argmax), threshold, temperature, preprocessing and the population
    check's settings (None when the model has none). Its fields are the checkpoint's top-level keys of the
    same names (the check's settings are read off `population_check`), and the JSON embedded in every
    exported file: a new served field is a new field here, nothing else."""

    arch: str
    class_names: tuple[str, ...]
    positive_class: str | None
    threshold: float | None
    preprocessing: PreprocessConfig
    temperature: float = 1.0
    population: PopulationSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: what exported files embed and checkpoints store."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        values.update(class_names=list(self.class_names), temperature=float(self.temperature),
                      threshold=None if self.threshold is None else float(self.threshold),
                      preprocessing=self.preprocessing.to_dict(),
                      population=None if self.population is None else self.population.to_dict())
        return values

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ServingConfig:
        """From the JSON embedded in an exported file (keys other than the fields, e.g. provenance, ignored)."""
        values = {field.name: config[field.name] for field in fields(cls) if field.name in config}
        values.update(positive_class=config.get("positive_class"), threshold=config.get("threshold"),
                      class_names=tuple(config["class_names"]),
                      temperature=float(config.get("temperature", 1.0)),
                      preprocessing=PreprocessConfig.from_dict(config["preprocessing"]),
                      population=PopulationSettings.from_dict(config.get("population")))
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> ServingConfig:
        return cls.from_dict({**checkpoint, "population": checkpoint.get(CHECKPOINT_KEY)})

    @property
    def positive_index(self) -> int | None:
        return self.class_names.index(self.positive_class) if self.positive_class is not None else None

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices: p(positive) >= threshold for a two-class model with a threshold, else argmax."""
        return predict_labels(probabilities, self.positive_index, self.threshold)

    def margin_needed(self, target: int) -> float:
        """The margin over the mean logit class `target` needs to be the answer (what Grad-CAM maps are drawn
        against)."""
        return margin_needed(target, len(self.class_names), self.positive_index, self.threshold, self.temperature)


def serving_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The JSON embedded in TorchScript, ONNX and AOTInductor files so they stand alone: the serving config,
    the checkpoint's provenance (absent mid-training) and its summary figures."""
    config = ServingConfig.from_checkpoint(checkpoint).to_dict()
    config.update({key: checkpoint.get(key) for key in PROVENANCE_KEYS})
    config["metrics"] = {
        split: {key: values[key] for key in SUMMARY_KEYS if key in values}
        for split, values in checkpoint.get("metrics", {}).items() if isinstance(values, dict)
    }
    return config
