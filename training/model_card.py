"""The model card of a model made by `make model`: the sections of the shipped cards (docs/model_cards/), filled
from what the run measured (its state.json and reports), never written by hand."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cxr.paths import REPO
from cxr_core.checkpoint import load_checkpoint
from training.make_model import Run

SHOWN_METRICS = {"roc_auc": "ROC AUC", "macro_auc": "macro AUC (one-vs-rest)", "accuracy": "accuracy",
                 "sensitivity": "sensitivity", "specificity": "specificity", "balanced_accuracy": "balanced accuracy"}


def _shown(path: str | Path) -> str:
    """A path as a reader of the repository would type it: relative to the repository where that is short."""
    relative = os.path.relpath(path, REPO)
    return relative if not relative.startswith("../../") else str(path)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _metrics_rows(report: dict[str, Any]) -> list[str]:
    rows = ["| metric | value | 95% CI (bootstrap) |", "|---|---|---|"]
    for key, label in SHOWN_METRICS.items():
        if key in report["metrics"]:
            low, high = report["ci95"].get(key, (float("nan"), float("nan")))
            rows.append(f"| {label} | {report['metrics'][key]:.3f} | {low:.3f} - {high:.3f} |")
    return rows


def _population_rows(summary: dict[str, Any]) -> list[str]:
    rows = ["| source / split | population | films | flagged (refused) |", "|---|---|---|---|"]
    for group, row in summary.get("groups", {}).items():
        if group.count("/") <= 1:
            rows.append(f"| {group} | {row.get('population', '')} | {row['films']} | {_share(row['flagged'])} |")
    return rows


def _failure_modes(summary: dict[str, Any], checkpoint: dict[str, Any]) -> list[str]:
    """What the measurements say the model gets wrong: the val -> test gap at the threshold, and the other
    sources whose test films the population check lets through more than 10% of the time."""
    lines = []
    val, test = checkpoint["metrics"].get("val", {}), checkpoint["metrics"].get("test", {})
    for key in ("sensitivity", "specificity"):
        if key in val and key in test:
            lines.append(f"- {key}: val {val[key]:.3f}, test {test[key]:.3f} at the served threshold.")
    leaky = [f"{group.split('/')[0]} ({1 - row['flagged']:.0%} of its test films let through)"
             for group, row in summary.get("groups", {}).items()
             if group.endswith("/test") and group.count("/") == 1 and row.get("population") == "other"
             and row["flagged"] < 0.9]
    lines.append("- The population check lets through films of: " + (", ".join(leaky) or "no known source over 10%")
                 + ". Answers on them are unvalidated.")
    return lines


def _options(request: Any) -> str:
    """The make options a run used beyond NAME, DATA and POSITIVE, as typed."""
    default = type(request)(name=request.name, data=request.data)
    shown = [f"VERSION={request.version}" if request.version != default.version else "",
             f"RULE={request.rule}" if request.rule != default.rule else "",
             f"EPOCHS={request.recipe.epochs}" if request.recipe.epochs != default.recipe.epochs else "",
             f"SIZE={request.recipe.image_size}" if request.recipe.image_size else "",
             *(f"OTHER={_shown(folder)}" for folder in request.others), *(f"EXTRA={item}" for item in request.extra)]
    return "".join(f" {option}" for option in shown if option)


def write_card(run: Run) -> Path:
    request, steps = run.request, run.state["steps"]
    plan = json.loads(run.path("plan.json").read_text())
    checkpoint_file = run.path("population", "model.pt")
    checkpoint = load_checkpoint(checkpoint_file)
    check = checkpoint.get("population_check") or {}
    summary = check.get("metrics") or {}
    calibration, report, train = steps["calibrate"]["calibration"], steps["report"], steps["train"]
    classes, positive = plan["class_names"], plan["positive_class"]
    decision = (f"p({positive}) >= {checkpoint['threshold']:.4f} ({calibration.get('rule', 'recall-first')})"
                if positive else "argmax of the calibrated probabilities")
    counts = plan["counts"]
    lines = [
        f"# Model card: `{request.name}`", "",
        "Sections after Mitchell et al. 2019, \"Model Cards for Model Reporting\". Written by `make model` from its "
        "measurements. Research and development only, **not for clinical use**.", "",
        "## Model details",
        f"- {checkpoint['arch']} fine-tuned from `{train['init']}` (no downloads), "
        f"{checkpoint['preprocessing']['image_size']} px input, classes {', '.join(classes)}; temperature "
        f"T = {checkpoint['temperature']:.3f}; decision: {decision}.",
        f"- Version {request.version}: `{_shown(steps['archive']['archive'])}` (default variant: "
        f"{report['variant']}) and its variants.",
        f"- Checkpoint `{_shown(checkpoint_file)}`, sha256 "
        f"`{hashlib.sha256(checkpoint_file.read_bytes()).hexdigest()}`: "
        f"epoch {train['best_epoch']} of {train['epochs']} (best val AUC {train['val_auc']:.3f}).",
        f"- Made with `make model NAME={request.name} DATA={_shown(request.data)}"
        + (f" POSITIVE={positive}" if positive else "") + _options(request) + "`.", "",
        "## Intended use",
        f"- Intended population: **{check.get('intended_population', 'films like its training films')}.**",
        "- Out of scope: any clinical decision; films unlike the training films (the population check refuses "
        "most of them with `422 outside the model's population`).", "",
        "## Data",
        f"- `{_shown(request.data)}`: {plan['split_rule']}.", "",
        "| split | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|",
        *(f"| {split} | " + " | ".join(str(c) for c in row) + " |" for split, row in counts.items()),
        f"- Left out by the check: {len(plan['left_out'])} files (listed in `plan.json`)."
        + (f" Extra training films: {train['extra_films']}." if train.get("extra_films") else ""), "",
        f"## Metrics (test split, {report['films']} films, through the exported `{report['variant']}` model as "
        "served)", *_metrics_rows(report), "",
        f"Population check on the test films: {_share(report['population_flagged'])} flagged; gate: "
        f"{_share(report['gate_refused'])} refused.", "",
    ]
    if "pointing" in report:
        pointing = report["pointing"]
        lines += ["## Where the explanation points",
                  f"Grad-CAM maximum inside a box on {pointing['hits']} of {pointing['films']} test {positive} "
                  f"films with boxes: **{pointing['share']:.1%}** (95% CI {pointing['ci95'][0]:.1%} - "
                  f"{pointing['ci95'][1]:.1%}); a box-sized random point: {pointing['baseline_share']:.1%}.", ""]
    lines += ["## The population check",
              f"Method: {check.get('method')}; limit {check.get('limit', float('nan')):.4f}. Excluded as the same "
              f"source as the data: {', '.join(summary.get('excluded_sources') or []) or 'none'}.",
              *_population_rows(summary), "",
              "## Calibration",
              *(f"- {split}: ECE {values['before']['ece']:.4f} -> {values['after']['ece']:.4f}, Brier "
                f"{values['before']['brier']:.4f} -> {values['after']['brier']:.4f}"
                for split, values in calibration.items() if isinstance(values, dict) and "before" in values), "",
              "## Time of each step (this machine)",
              "| step | seconds |", "|---|---|",
              *(f"| {name} | {facts['seconds']:.0f} |" for name, facts in steps.items() if name != "card"), "",
              "## Known failure modes", *_failure_modes(summary, checkpoint), "",
              "## Caveats",
              "Measured on the data set's own test split; films from another source are the honest test. Not "
              "validated prospectively.", ""]
    path = run.path("model_card.md")
    path.write_text("\n".join(lines))
    return path
