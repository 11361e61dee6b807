"""Narrow one class of a model's population check to the films its boundary was learned on
(cxr_core.population, `NARROW_KEY`), report what that changes, and write a copy of the checkpoint that carries it.

    python -m training.narrow_class --checkpoint models/cxr4/model.pt --output runs/narrow-cxr4/model.pt \\
        --report docs/population/cxr4_normal.md

cxr4 learned NORMAL against PNEUMONIA from children only (Kermany): its PNEUMONIA films are all pediatric, so
for an adult it cannot tell NORMAL from pneumonia, yet it answers NORMAL for many adults with pneumonia. The
narrowed class is NORMAL: a logistic layer on cxr4's own feature statistics tells the Kermany children
(pediatric training films: `CHILDREN`) from every adult source's training films (`ADULTS`); its limit accepts
99% of each class of the children's validation films. A film whose most likely class is NORMAL and that scores
above that limit is refused as outside the population (422, saying whom the NORMAL answer is for) instead of
answered NORMAL. Its other answers (COVID-19, tuberculosis, pneumonia) are unchanged. Fitted on train, limit on
val, the test splits reported once.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.commands import command_parser
from cxr.paths import data_root
from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint, write_checkpoint
from cxr_core.population import CHECKPOINT_KEY, NARROW_KEY, TAPS, CheckedModel, check_tensors, outside
from cxr_core.preprocessing import EvalPreset
from training.fit_population import fit_logistic, scores, tap_columns, with_limit
from training.population_data import Film, cached_features, catalog, with_rsna_classes

CHILDREN = ("kermany", "kermany_in_crd", "samples")
ADULTS = ("crd_normal", "crd_covid", "tbx11k", "rsna")
STRENGTH = 0.1  # the logistic layer's C (children and adults are far apart; a weak fit generalises)
INTENDED = ("Frontal chest X-rays like its four training sources: COVID-19 Radiography Database (adult normal, "
            "COVID-19), Kermany pediatric pneumonia, TBX11K tuberculosis. NORMAL is answered for children only: "
            "its PNEUMONIA class holds only children, so for an adult it cannot rule out pneumonia (for adults "
            "ask the model `adult`)")


def narrowed(checkpoint: dict[str, Any], narrow: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with `narrow` in its population check and the check's intended population saying so."""
    check = {**checkpoint[CHECKPOINT_KEY], NARROW_KEY: narrow, "intended_population": INTENDED}
    return {**checkpoint, CHECKPOINT_KEY: check}


def served_scores(check: dict[str, Any], model: torch.nn.Module, logits: np.ndarray, features: np.ndarray
                  ) -> np.ndarray:
    """The population scores the served graph computes (CheckedModel.check_score) from cached logits and features."""
    with torch.no_grad():
        return CheckedModel(model, check).check_score(torch.as_tensor(logits, dtype=torch.float32),
                                                      torch.as_tensor(features, dtype=torch.float32)).numpy()


def effect_table(films: list[Film], logits: np.ndarray, before: np.ndarray, after: np.ndarray, limit: float,
                 class_names: tuple[str, ...], narrow_class: int) -> list[dict[str, Any]]:
    """Per source, split and label: films, answered the narrowed class before, refused before and after."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for row, film in enumerate(films):
        groups.setdefault((film.source, film.split, film.label), []).append(row)
    table = []
    for (source, split, label), rows in sorted(groups.items()):
        rows_ = np.asarray(rows)
        said = logits[rows_].argmax(axis=1)
        answered_before = ~outside(before[rows_], limit)
        answered_after = ~outside(after[rows_], limit)
        table.append({"source": source, "split": split, "label": label, "films": len(rows),
                      "refused_before": int((~answered_before).sum()), "refused_after": int((~answered_after).sum()),
                      f"{class_names[narrow_class]}_before": int((answered_before & (said == narrow_class)).sum()),
                      f"{class_names[narrow_class]}_after": int((answered_after & (said == narrow_class)).sum()),
                      "answers_after": dict(Counter(class_names[k] for k in said[answered_after]))})
    return table


def write_report(path: Path, table: list[dict[str, Any]], class_name: str, narrow: dict[str, Any]) -> None:
    lines = [f"# {class_name} answered for children only: what the narrowed check changes", "",
             f"Logistic layer (layer1-4 statistics, C={STRENGTH}) telling the Kermany children from the adult sources "
             f"({', '.join(ADULTS)}), fitted on train; limit {narrow['limit']:.4f} (99% of each class of the "
             f"children's val films accepted). Children's val films over the limit: "
             f"{100 * narrow['children_val_flagged']:.1f}%; adults' val films over it: "
             f"{100 * narrow['adults_val_flagged']:.1f}%. Written by `python -m training.narrow_class`.", "",
             f"| source | split | label | films | refused before | refused after | {class_name} before | "
             f"{class_name} after | answers after |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        answers = ", ".join(f"{name} {count}" for name, count in sorted(row["answers_after"].items()))
        lines.append(f"| {row['source']} | {row['split']} | {row['label']} | {row['films']} | {row['refused_before']} "
                     f"| {row['refused_after']} | {row[f'{class_name}_before']} | {row[f'{class_name}_after']} | "
                     f"{answers} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(checkpoint)
    config = ServingConfig.from_checkpoint(checkpoint)
    class_index = config.class_names.index(args.class_name)
    # pneumonia/ train and val are left out: multiclass PNEUMONIA holds copies of them, split for split
    films = [film for film in with_rsna_classes(catalog(Path(args.data_root)), Path(args.data_root))
             if not (film.folder == "pneumonia" and film.split != "test")]
    logits, features = cached_features(model, films, EvalPreset(config.preprocessing),
                                       Path(args.output).parent / "features.npz", Path(args.checkpoint), args.device)

    def pick(sources: tuple[str, ...], split: str, label: str | None = None) -> np.ndarray:
        return features[[f.source in sources and f.split == split and label in (None, f.label) for f in films]]

    fitted = fit_logistic(pick(CHILDREN, "train"), pick(ADULTS, "train"), tap_columns(model, TAPS), STRENGTH)
    fitted = with_limit(fitted, [pick(CHILDREN, "val", label) for label in ("NORMAL", "PNEUMONIA")])
    narrow = {"class_index": class_index, "class": args.class_name, "limit": fitted["limit"],
              **check_tensors(fitted), "method": f"logistic, layer1-4, C={STRENGTH}",
              "children_val_flagged": float(outside(scores(fitted, pick(CHILDREN, "val")), fitted["limit"]).mean()),
              "adults_val_flagged": float(outside(scores(fitted, pick(ADULTS, "val")), fitted["limit"]).mean())}
    result = narrowed(checkpoint, narrow)
    check = {key: value for key, value in checkpoint[CHECKPOINT_KEY].items() if key != NARROW_KEY}  # before
    table = effect_table(films, logits, served_scores(check, model, logits, features),
                         served_scores(result[CHECKPOINT_KEY], model, logits, features), float(check["limit"]),
                         config.class_names, class_index)
    summary = {key: narrow[key] for key in ("class", "limit", "children_val_flagged", "adults_val_flagged")}
    write_report(Path(args.report), table, args.class_name, narrow)
    Path(args.report).with_suffix(".json").write_text(json.dumps({"summary": summary, "table": table}, indent=1))
    write_checkpoint(args.output, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output}, {args.report} and its .json")
    return {"summary": summary, "table": table}


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/cxr4/model.pt")
    parser.add_argument("--class-name", default="NORMAL", help="the class answered for children only")
    parser.add_argument("--data-root", default=str(data_root()))
    parser.add_argument("--output", required=True, help="the checkpoint with the narrowed check (the input stays)")
    parser.add_argument("--report", default="runs/reports/narrow_class.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default=2, type=int)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
