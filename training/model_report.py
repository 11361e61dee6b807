"""The test report of a model made by `make model`: its test films through the exported model that its archive
serves (ServedModel: the same backend, population check and gate as the handler), with 95% bootstrap intervals,
and, where the data has boxes around findings, where its explanation points (training.pointing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cxr.data import image_files
from cxr.metrics import classification_report
from cxr.paths import SHIPPED_GATE
from cxr_core.checkpoint import load_checkpoint
from cxr_core.population import outside
from cxr_core.served import ServedModel
from cxr_core.settings import HandlerSettings
from cxr_core.variants import VARIANTS
from export.archive import fastest_exact_variant
from training.evaluate import write_report
from training.fine_tune import parse_boxes
from training.make_model import Run


def served_outputs(model_file: Path, paths: list[Path], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Probabilities, population scores and gate scores of `paths` as the archive's handler computes them."""
    served = ServedModel.load(model_file, SHIPPED_GATE if SHIPPED_GATE.is_file() else None, "cpu",
                              HandlerSettings())
    columns: dict[str, list[np.ndarray]] = {"probabilities": [], "population": [], "gate": []}
    for start in tqdm(range(0, len(paths), batch_size), desc="test films", leave=False):
        images = torch.stack([served.preset.load(path) for path in paths[start:start + batch_size]])
        outputs = served.run(images)
        columns["probabilities"].append(outputs.probabilities)
        columns["population"].append(outputs.population_scores if outputs.population_scores is not None
                                     else np.full(len(images), np.nan))
        columns["gate"].append(outputs.gate_scores if outputs.gate_scores is not None
                               else np.full(len(images), np.nan))
    result = {key: np.concatenate(value) for key, value in columns.items()}
    result["population_limit"] = np.asarray(served.population.limit if served.population else np.nan)
    result["gate_limit"] = np.asarray(served.gate.limit if served.gate else np.nan)
    return result


def test_report(run: Run) -> dict[str, Any]:
    plan = json.loads(run.path("plan.json").read_text())
    class_names, positive = plan["class_names"], plan["positive_class"]
    export_dir, folder = run.path("export"), run.path("report")
    variant = fastest_exact_variant(export_dir)
    checkpoint = load_checkpoint(run.path("population", "model.pt"))
    films = [(path, label) for label, name in enumerate(class_names) for path in image_files(run.tree / "test" / name)]
    labels = np.array([label for _, label in films])
    outputs = served_outputs(export_dir / VARIANTS[variant].file_name, [path for path, _ in films])
    positive_index = class_names.index(positive) if positive else None
    scored = classification_report(labels, outputs["probabilities"], class_names, positive_index=positive_index,
                                   threshold=checkpoint.get("threshold"), bootstrap=1000)
    write_report(scored, labels, outputs["probabilities"], class_names, folder, "test")
    flagged = outside(outputs["population"], float(outputs["population_limit"]))
    facts: dict[str, Any] = {
        "variant": variant, "films": len(films),
        "metrics": {key: scored[key] for key in ("roc_auc", "macro_auc", "accuracy", "sensitivity", "specificity",
                                                  "balanced_accuracy") if key in scored},
        "ci95": scored.get("ci95", {}),
        "population_flagged": float(np.mean(flagged)),
        "gate_refused": float(np.nanmean(outputs["gate"] > outputs["gate_limit"])) if SHIPPED_GATE.is_file() else None,
    }
    boxes = plan.get("boxes")
    if boxes and positive:
        from training.pointing import plot_examples, pointing_game

        with_boxes = [(path, parse_boxes(boxes[key])) for path, label in films if label == positive_index
                      and (key := path.relative_to(run.tree).as_posix()) in boxes and boxes[key]]
        if with_boxes:
            facts["pointing"] = pointing_game(checkpoint, with_boxes, target=positive_index)
            facts["pointing"].pop("per_film", None)
            plot_examples(folder / "pointing.png", checkpoint, with_boxes[:8], target=positive_index)
    (folder / "report.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts
