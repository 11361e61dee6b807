"""A model file ready to answer, loaded once per worker: its runtime (`cxr_core.backends`), its serving config
(classes, threshold, preprocessing, population check), the preprocessing preset, the gate, and how its
population check is set. The handler asks it; nothing reads a checkpoint or an embedded config dict twice."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cxr_core.backends import Backend, TorchBackend, load_backend
from cxr_core.explain import CAM_LAYERS, grad_cam, model_view, overlay_png
from cxr_core.gate import GATE_FILE, OodGate
from cxr_core.policy import Refusal
from cxr_core.population import verdict
from cxr_core.preprocessing import EvalPreset
from cxr_core.settings import HandlerSettings

log = logging.getLogger(__name__)


@dataclass
class Outputs:
    """What one pass over a batch of model inputs gives: per image, the calibrated probabilities, the decided
    class index, the gate's score and the population score (None where not computed)."""

    probabilities: np.ndarray
    labels: np.ndarray
    gate_scores: np.ndarray | None
    population_scores: np.ndarray | None


class ServedModel:
    def __init__(self, backend: Backend, gate: OodGate | None, population_check: str) -> None:
        self.backend, self.gate = backend, gate
        self.config = backend.config
        self.preset = EvalPreset(self.config.preprocessing)
        self.population = self.config.population  # None: the model has no population check
        # refuse, warn or off as the handler setting says; absent for a model without a check
        self.population_mode = population_check if self.population is not None else "absent"

    @classmethod
    def load(cls, model_file: str | os.PathLike, gate_file: str | os.PathLike | None, device: str,
             settings: HandlerSettings) -> ServedModel:
        """The model in `model_file` (any exported variant) with the gate in `gate_file` when the settings
        keep the gate on."""
        backend = load_backend(model_file, device, threads=settings.threads, half=settings.fp16,
                               spin=settings.onnx_spin)
        gate = None
        if settings.ood_gate and gate_file is not None and os.path.exists(gate_file):
            gate = OodGate.load(gate_file, device)
        elif settings.ood_gate:
            log.warning("ood_gate is on but the archive has no %s: every image will be classified", GATE_FILE)
        served = cls(backend, gate, settings.population_check)
        if served.population_mode == "absent" and settings.population_check != "off":
            log.warning("%s has no population check: answers say population check 'absent'", model_file)
        return served

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def run(self, images: torch.Tensor) -> Outputs:
        """One forward pass (the population check is part of it), the decision, and the gate's scores."""
        probabilities, population = self.backend.run(images)
        if self.population_mode not in ("refuse", "warn"):
            population = None
        gate_scores = None
        if self.gate is not None:
            mean, std = self.config.preprocessing.mean[0], self.config.preprocessing.std[0]
            gate_scores = self.gate.scores(images, mean, std).numpy()
        return Outputs(probabilities, self.config.decide(probabilities), gate_scores, population)

    def answer(self, outputs: Outputs, row: int) -> dict[str, Any]:
        """The model's part of the answer for image `row` of `outputs`: label, probabilities, threshold, gate
        and population."""
        gate = {"ran": False} if outputs.gate_scores is None else \
            {"ran": True, "score": round(float(outputs.gate_scores[row]), 4), "limit": round(self.gate.limit, 4)}
        population_score = None if outputs.population_scores is None else float(outputs.population_scores[row])
        population = verdict(population_score, self.population, self.population_mode)
        if population["inside"] is False:  # `warn`: answered, but say whom the model is for
            population.update(self.population.whom())
        probabilities = {name: round(float(p), 6)
                         for name, p in zip(self.class_names, outputs.probabilities[row], strict=True)}
        return {"label": self.class_names[int(outputs.labels[row])], "probabilities": probabilities,
                "threshold": self.config.threshold, "gate": gate, "population": population}

    def explain(self, images: torch.Tensor, labels: np.ndarray) -> list[dict[str, Any]]:
        """Grad-CAM for each image's decided class (its evidence above what it needs to be the answer), with the
        eager model; other runtimes refuse (501)."""
        if not isinstance(self.backend, TorchBackend) or self.backend.name != "eager" or \
                self.config.arch not in CAM_LAYERS:
            raise Refusal("no_explanation", f"this archive ({self.backend.name} backend) does not explain; send "
                                            "explanations to the eager archive (pneumonia_eager)")
        targets = [int(label) for label in labels]
        heatmaps = grad_cam(self.backend.model, self.config.arch, images.to(self.backend.device), targets,
                            [self.config.margin_needed(target) for target in targets])
        mean, std = self.config.preprocessing.mean[0], self.config.preprocessing.std[0]
        return [{"explained_class": self.class_names[int(label)], "heatmap": np.round(heatmap, 3).tolist(),
                 "overlay_png": overlay_png(model_view(image, mean, std), heatmap)}
                for image, heatmap, label in zip(images, heatmaps, labels, strict=True)]

    def describe(self) -> dict[str, Any]:
        """Classes, threshold, preprocessing, runtime, gate, and whom the model is for with its check's setting."""
        described = {"class_names": list(self.class_names), "positive_class": self.config.positive_class,
                     "threshold": self.config.threshold, "preprocessing": self.config.preprocessing.to_dict(),
                     "backend": self.backend.name, "gate": self.gate is not None,
                     "population_check": self.population_mode}
        if self.population is not None:
            described.update(self.population.whom(), population_limit=self.population.limit,
                             population_kind=self.population.kind)
        return described
