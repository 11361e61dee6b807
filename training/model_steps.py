"""The steps of `make model` (training.make_model), one function each: a Run in, the facts to record out.

Each step reads what earlier steps wrote into the run folder and writes only there (the archive step also into
the model store, never over an archive that is already there).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cxr.data import IMAGE_EXTENSIONS, image_files
from cxr.paths import REPO, SHIPPED_GATE
from cxr_core.checkpoint import ServingConfig, load_checkpoint, save_checkpoint, write_checkpoint
from cxr_core.gate import OodGate
from cxr_core.preprocessing import EvalPreset, load_image
from cxr_core.variants import VARIANTS
from training.fine_tune import Sample, choose_start, fine_tune, parse_boxes, recipe_preprocessing, starting_model
from training.make_model import Run
from training.own_data import MANIFEST, DataError, DataPlan, describe, plan_data, split_counts

SHIPPED = (REPO / "models" / "pneumonia" / "model.pt", REPO / "models" / "cxr4" / "model.pt")
BOX_COLUMNS = ("boxes", "opacity_boxes_xywh")  # a manifest column of boxes around findings: x y w h;x y w h
MIN_GATE_ACCEPTED = 0.99


def _refuse_taken_archives(run: Run) -> list[str]:
    """The archive names of this model and version; DataError when one is in the model store already (checked
    before training and again before archiving: an archive is never overwritten)."""
    from export.archive import archive_stem

    stems = [archive_stem(run.request.name, variant, run.request.version) for variant in (None, *VARIANTS)]
    taken = [stem for stem in stems if (run.model_store / f"{stem}.mar").exists()]
    if taken:
        raise DataError(f"{run.model_store / taken[0]}.mar exists already: make a new version with VERSION=<x.y> "
                        "(an archive is never overwritten)")
    return stems


def _shown(path: Path) -> str:
    """A path as answers name it: relative to the repository where it lies inside it."""
    return str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path.resolve())


def _plan(run: Run) -> dict[str, Any]:
    return json.loads(run.path("plan.json").read_text())


def _tree_name(film: Path, data: Path) -> str:
    """A film's file name in the tree: its path under the user's folder, flattened (unique per class)."""
    relative = film.relative_to(data) if film.is_relative_to(data) else Path(film.name)
    name = "__".join(relative.parts)
    return name if film.suffix.lower() in IMAGE_EXTENSIONS else name + ".png"


def _materialise(plan: DataPlan, tree: Path) -> dict[str, str]:
    """Links to the user's films under tree/<split>/<CLASS>/ (DICOM decoded once as served, to PNG); returns
    {tree path: the user's file}."""
    origin = {}
    for split, films in plan.splits.items():
        for film in tqdm(films, desc=f"{split} films", leave=False):
            target = tree / split / plan.class_names[film.label] / _tree_name(film.path, plan.data)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                if film.path.suffix.lower() in IMAGE_EXTENSIONS:
                    target.symlink_to(film.path.resolve())
                else:
                    load_image(film.path.read_bytes(), None).save(target)
            origin[target.relative_to(tree).as_posix()] = str(film.path)
    return origin


def _boxes(data: Path) -> dict[str, str] | None:
    """{file relative to data: boxes text} from the manifest's box column, if it has one."""
    manifest = data / MANIFEST
    if not manifest.is_file():
        return None
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    column = next((c for c in BOX_COLUMNS if rows and c in rows[0]), None)
    return None if column is None else {row["file"]: row[column] or "" for row in rows if row.get("file")}


def check(run: Run) -> dict[str, Any]:
    request = run.request
    _refuse_taken_archives(run)
    plan = plan_data(Path(request.data), name=request.name, positive=request.positive, seed=request.seed,
                     served=run.served)
    print(describe(plan))
    origin = _materialise(plan, run.tree)
    boxes = _boxes(plan.data)
    plan_file = {"class_names": list(plan.class_names), "positive_class": plan.positive_class,
                 "layout": plan.layout, "split_rule": plan.split_rule, "counts": split_counts(plan),
                 "left_out": [[str(item.path), item.reason] for item in plan.left_out],
                 "origin": origin, "boxes": None if boxes is None else {
                     tree: boxes.get(Path(source).relative_to(plan.data).as_posix())
                     for tree, source in origin.items() if Path(source).is_relative_to(plan.data)}}
    run.path("plan.json").write_text(json.dumps(plan_file, indent=1) + "\n")
    return {"films": sum(map(sum, plan_file["counts"].values())), "left_out": len(plan.left_out),
            "counts": plan_file["counts"], "split_rule": plan.split_rule, "boxes": boxes is not None,
            "check_seconds": round(plan.check_seconds, 1)}


def _samples(run: Run, split: str, class_names: list[str], boxes: dict[str, str | None] | None) -> list[Sample]:
    samples = []
    for label, name in enumerate(class_names):
        for path in image_files(run.tree / split / name):
            key = path.relative_to(run.tree).as_posix()
            known = boxes is not None and key in boxes
            samples.append(Sample(path, label, parse_boxes(boxes[key] or "") if known else None))
    return samples


def _extra_samples(run: Run, class_names: list[str], held: list[Path]) -> list[Sample]:
    """CLASS=FOLDER training films, without any that is a copy of one of the val/test films (same pixels)."""
    from training.population_data import copies, thumbnails

    extra = []
    reference = thumbnails(held, "val/test thumbnails")
    for item in run.request.extra:
        name, _, folder = item.partition("=")
        if name not in class_names or not Path(folder).is_dir():
            raise DataError(f"EXTRA={item}: need CLASS=FOLDER with CLASS one of {', '.join(class_names)} and an "
                            "existing folder")
        paths = image_files(folder, "**/*")
        copied = copies(thumbnails(paths, f"extra {name}"), reference)
        extra += [Sample(path, class_names.index(name), None) for path, copy in zip(paths, copied, strict=True)
                  if not copy]
    return extra


def train(run: Run) -> dict[str, Any]:
    plan = _plan(run)
    class_names, positive = plan["class_names"], plan["positive_class"]
    train_samples = _samples(run, "train", class_names, plan["boxes"])
    val_samples = _samples(run, "val", class_names, plan["boxes"])
    positive_index = class_names.index(positive) if positive else None
    init, start_scores = choose_start([path for path in SHIPPED if path.is_file()], train_samples, val_samples,
                                      positive_index)
    model, preprocessing = starting_model(init, class_names, positive)
    preprocessing = recipe_preprocessing(preprocessing, run.request.recipe)
    added = []
    if run.request.extra:
        held = [s.path for s in val_samples] + [s.path for s in _samples(run, "test", class_names, None)]
        added = _extra_samples(run, class_names, held)
        print(f"extra training films: {len(added)}")
    folder = run.path("train")
    folder.mkdir(parents=True, exist_ok=True)
    config = ServingConfig(arch=load_checkpoint(init)["arch"], class_names=tuple(class_names),
                           positive_class=positive, threshold=None, preprocessing=preprocessing)
    best = {"val_auc": -1.0, "epoch": 0}
    if (folder / "best.pt").is_file():  # an interrupted train step: its best epoch so far
        kept = load_checkpoint(folder / "best.pt")
        best.update(val_auc=kept["metrics"]["val_auc"], epoch=kept["epoch"])
    train_config = {"recipe": run.request.recipe.__dict__, "init": str(init.relative_to(REPO)),
                    "extra_films": len(added)}

    def keep_best(row: dict[str, Any], network: torch.nn.Module) -> None:
        if row["val_auc"] > best["val_auc"]:
            best.update(val_auc=row["val_auc"], epoch=row["epoch"])
            save_checkpoint(folder / "best.pt", network, config, metrics={"val_auc": row["val_auc"]},
                            train_config=train_config, data_manifest_sha256=run.request.key(), epoch=row["epoch"],
                            half=True)

    history = fine_tune(model, preprocessing, train_samples + added, val_samples, run.request.recipe, positive_index,
                        on_epoch=keep_best, state_file=folder / "last_epoch.pt")
    (folder / "last_epoch.pt").unlink(missing_ok=True)  # the step is done: its resume point is not needed
    (folder / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return {"init": train_config["init"], "start_scores": start_scores, "best_epoch": best["epoch"],
            "val_auc": best["val_auc"],
            "train_films": len(train_samples), "extra_films": len(added), "epochs": len(history),
            "seconds_per_epoch": float(np.median([row["seconds"] for row in history]))}


def calibrate(run: Run) -> dict[str, Any]:
    from training.calibrate import calibrate as fit_calibration

    best = load_checkpoint(run.path("train", "best.pt"))
    calibration = fit_calibration(best, run.tree, min_sensitivity=run.request.min_sensitivity,
                                  rule=run.request.rule, report_dir=run.path("calibrate"), splits=("val", "test"))
    write_checkpoint(run.path("calibrate", "model.pt"), calibration.apply(best))
    return {"temperature": calibration.temperature, "threshold": calibration.threshold,
            "calibration": calibration.report}


def gate(run: Run) -> dict[str, Any]:
    """The shipped gate must accept the val films (the check step already left out the few it refused)."""
    if not SHIPPED_GATE.is_file():
        return {"accepted": None, "note": "no gate file"}
    preprocessing = ServingConfig.from_checkpoint(load_checkpoint(run.path("calibrate", "model.pt"))).preprocessing
    preset, screen = EvalPreset(preprocessing), OodGate.load(SHIPPED_GATE)
    paths = image_files(run.tree / "val", "*/*")
    scores = []
    for start in range(0, len(paths), 64):
        batch = torch.stack([preset.load(path) for path in paths[start:start + 64]])
        scores += screen.scores(batch, preprocessing.mean[0], preprocessing.std[0]).tolist()
    accepted = float(np.mean(np.asarray(scores) <= screen.limit))
    if accepted < MIN_GATE_ACCEPTED:
        raise DataError(f"the gate refuses {1 - accepted:.1%} of the val films as not chest X-rays: look at them "
                        f"(runs the gate with `python -m training.own_data --data {run.request.data}`)")
    return {"accepted": accepted, "val_films": len(paths)}


def population(run: Run) -> dict[str, Any]:
    from training.own_population import fit_own_check

    request = run.request
    root = Path(request.data_root) if request.data_root else None
    data = Path(request.data)
    own_source = data.name if root is not None and data.is_relative_to(root) else None
    intended = request.intended or (f"Films like the {run.facts('check')['films']} of {data} that {request.name} "
                                    f"was trained on ({', '.join(_plan(run)['class_names'])})")
    summary = fit_own_check(run.path("calibrate", "model.pt"), name=request.name, data_tree=run.tree,
                            data_root=root, others=[Path(o) for o in request.others], own_source=own_source,
                            output=run.path("population", "model.pt"), report_dir=run.path("population"),
                            intended_population=intended,
                            model_card=request.model_card or _shown(run.path("model_card.md")))
    return {"method": summary.get("method"), "limit": summary.get("limit"),
            "excluded_sources": summary.get("excluded_sources")}


def export(run: Run) -> dict[str, Any]:
    from export.__main__ import get_args_parser, main

    args = get_args_parser().parse_args(["--checkpoint", str(run.path("population", "model.pt")),
                                         "--data", str(run.tree), "--output-dir", str(run.path("export"))])
    try:
        main(args)
    except SystemExit:  # a variant failed its check: fatal unless it is an approximate one (int8), left out
        pass
    variants = json.loads(run.path("export", "export_report.json").read_text())["variants"]
    failed = [name for name, row in variants.items() if row["check"] != "pass"]
    if any(VARIANTS[name].exact for name in failed):
        raise DataError(f"exported variants {', '.join(failed)} do not match eager ({run.path('export')}): see "
                        "export_report.json there")
    if failed:
        print(f"left out (failed their check, not archived): {', '.join(failed)}")
    return {"variants": {name: row["check"] for name, row in variants.items()}, "left_out": failed}


def archive(run: Run) -> dict[str, Any]:
    from export.archive import get_args_parser as archive_args
    from export.archive import main as build

    stems = _refuse_taken_archives(run)
    args = archive_args().parse_args(["--export-dir", str(run.path("export")), "--model-store", str(run.model_store),
                                      "--name", run.request.name, "--version", run.request.version])
    built = build(args)
    return {"archive": str(run.model_store / f"{stems[0]}.mar"), "archives": [str(path) for path in built]}


def report(run: Run) -> dict[str, Any]:
    from training.model_report import test_report

    return test_report(run)


def card(run: Run) -> dict[str, Any]:
    from training.model_card import write_card

    path = write_card(run)
    return {"card": str(path)}

