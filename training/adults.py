"""What a served model answers on adult chest films (RSNA), per label, RSNA class and view.

    python -m training.adults --checkpoint models/cxr4/model.pt --data ../shared/data/rsna --split test \\
        --output runs/adults/cxr4.md

The model runs as served (cxr_core.served.ServedModel from its checkpoint, the shipped gate, the shipped handler
settings: population check `refuse`; requests admitted by cxr_core.policy.RequestPolicy): for each film the gate's
refusal, the population check's verdict and the label answered. Then whether a check the stack already has could
tell such films apart: the pediatric `pneumonia` model's population check (fitted to flag films that are not
Kermany children) on the same films and on the model's own multiclass/ films of the same split, per class, with
multiclass/NORMAL split into its adult films and its Kermany pediatric copies (found by their pixels).
RSNA films that are pixel copies of multiclass/train/NORMAL films (the model trained on them) are counted.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.commands import command_parser
from cxr.data import image_files
from cxr.metrics import roc_auc
from cxr.paths import SHIPPED_GATE, data_root
from cxr.report import table, write_markdown_and_json
from cxr_core.policy import Refusal, RequestPolicy
from cxr_core.population import outside
from cxr_core.served import ServedModel
from cxr_core.settings import HandlerSettings
from training.pointing import wilson_interval
from training.population_data import COPY_CORRELATION, Film, mark_kermany_copies, thumbnail
from training.population_report import percent

GROUPINGS = (("label", "rsna label"), ("rsna_class", "RSNA class"), ("view", "view"),
             ("class_view", "RSNA class x view"))
FILM_KEYS = ("file", "label", "rsna_class", "view", "answer", "top", "gate", "population", "flagged", "refused",
             "copy", "pediatric", "pediatric_flagged")
MULTICLASS = ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS")


def load_served(model_file: str | Path, gate_file: str | Path | None, threads: int) -> ServedModel:
    """The model as the shipped handler serves it (default settings: gate on unless no gate file is given,
    population check refuse)."""
    gate_file = gate_file or None
    return ServedModel.load(model_file, gate_file, "cpu", HandlerSettings(threads=threads, ood_gate=bool(gate_file)))


def serve_films(served: ServedModel, paths: Sequence[Path], batch_size: int = 32) -> list[dict[str, Any]]:
    """Per film: the label answered and its probability, the gate's and the population check's scores and the
    reason it is refused (None: answered), each decided by the handler's own rules."""
    settings = HandlerSettings()
    policy = RequestPolicy(settings, served.preset)
    gate_limit = served.gate.limit if served.gate is not None else None
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        tensors, rows = [], []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(policy.admit_image(Path(path).read_bytes(), "", settings.max_request_pixels)[0])
                rows.append({"film": str(path)})
            except Refusal as refusal:
                results.append({"film": str(path), "refused": refusal.reason})
        if not tensors:
            continue
        outputs = served.run(torch.stack(tensors))
        for k, row in enumerate(rows):
            gate = None if outputs.gate_scores is None else outputs.gate_scores[k:k + 1]
            population = None if outputs.population_scores is None else outputs.population_scores[k:k + 1]
            refusal = policy.judge(gate_scores=gate, population_scores=population, gate_limit=gate_limit,
                                   population=served.population, population_mode=served.population_mode)
            row.update(answer=served.class_names[int(outputs.labels[k])],
                       top=float(outputs.probabilities[k].max()),
                       gate=None if gate is None else float(gate[0]),
                       population=None if population is None else float(population[0]),
                       gated=gate is not None and bool(gate[0] > gate_limit),
                       flagged=population is not None and bool(outside(population[0], served.population.limit)),
                       refused=None if refusal is None else refusal.reason)
            results.append(row)
    order = {str(path): index for index, path in enumerate(paths)}
    return sorted(results, key=lambda row: order[row["film"]])


def rsna_films(data: Path, split: str) -> list[dict[str, str]]:
    with open(data / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == split]
    for row in rows:
        row["path"] = str(data / row["file"])
        row["class_view"] = f"{row['rsna_class']}, {row['view']}"
    return rows


def pixel_copies(paths: Sequence[Path], references: Sequence[Path]) -> np.ndarray:
    """Whether each film's thumbnail correlates >= COPY_CORRELATION with one of `references` (same picture)."""
    if not paths or not references:
        return np.zeros(len(paths), dtype=bool)
    reference = np.stack([thumbnail(Path(path)) for path in references])
    candidates = np.stack([thumbnail(Path(path)) for path in paths])
    return (candidates @ reference.T).max(axis=1) >= COPY_CORRELATION


def summarise(rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """Films, flagged and gated shares, and the answered labels (count, share of answered, mean probability)."""
    count = len(rows)
    answered = [row for row in rows if row.get("refused") is None]
    labels = {name: [row["top"] for row in answered if row["answer"] == name] for name in class_names}
    said = Counter(row["answer"] for row in rows if "answer" in row)  # irrespective of refusals
    return {"films": count, "flagged": sum(bool(row.get("flagged")) for row in rows) / count if count else np.nan,
            "gated": sum(bool(row.get("gated")) for row in rows) / count if count else np.nan,
            "answered": len(answered),
            "answers": {name: {"n": len(tops), "share": len(tops) / len(answered) if answered else np.nan,
                               "mean_top": float(np.mean(tops)) if tops else np.nan}
                        for name, tops in labels.items()},
            "said_all": dict(said), "copies": sum(bool(row.get("copy")) for row in rows)}


def answer_cells(summary: dict[str, Any], class_names: Sequence[str]) -> list[str]:
    cells = []
    for name in class_names:
        answer = summary["answers"][name]
        cells.append("0" if not answer["n"] else
                     f"{answer['n']} ({percent(answer['share'])}, p {answer['mean_top']:.2f})")
    return cells


def multiclass_films(multiclass: Path, split: str) -> list[tuple[str, Path]]:
    """(group, path) of multiclass/<split>: each class, NORMAL split into adult films and Kermany copies."""
    films = [Film(path, "crd_normal" if name == "NORMAL" else name, split, name, "multiclass")
             for name in MULTICLASS for path in image_files(multiclass / split / name)]
    kermany = multiclass.parent / "pneumonia"
    reference = [Film(path, "kermany", part, "NORMAL", "pneumonia")
                 for part in ("train", "val", "test") for path in image_files(kermany / part / "NORMAL")]
    marked = mark_kermany_copies(films + reference)[:len(films)]
    groups = {"crd_normal": "NORMAL (adult, CRD)", "kermany_in_crd": "NORMAL (Kermany pediatric copies)"}
    return [(groups.get(film.source, film.label), film.path) for film in marked]


def run(args: argparse.Namespace) -> dict[str, Any]:
    served = load_served(args.checkpoint, args.gate, args.threads)
    names = list(served.class_names)
    films = rsna_films(Path(args.data), args.split)
    results = serve_films(served, [Path(row["path"]) for row in films], args.batch_size)
    multiclass = Path(args.multiclass)
    copies = pixel_copies([Path(row["path"]) for row in films], image_files(multiclass / "train" / "NORMAL"))
    rows = [{**film, **result, "copy": bool(copy)} for film, result, copy in zip(films, results, copies, strict=True)]
    groups: dict[str, dict[str, Any]] = {"all": summarise(rows, names)}
    for key, _ in GROUPINGS:
        for value in sorted({row[key] for row in rows}):
            groups[f"{key}={value}"] = summarise([row for row in rows if row[key] == value], names)
    opacity = [row for row in rows if row["label"] == "OPACITY"]
    normal = sum(row.get("refused") is None and row["answer"] == "NORMAL" for row in opacity)
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "split": args.split, "groups": groups,
                              "opacity_answered_normal": {"n": normal, "of": len(opacity),
                                                          "share": normal / len(opacity) if opacity else np.nan,
                                                          "ci95": wilson_interval(normal, len(opacity))}}
    if args.adult_check:
        result["adult_check"] = compare_checks(args, served, rows, multiclass)
    return {"result": result, "rows": rows, "names": names}


def compare_checks(args: argparse.Namespace, served: ServedModel, rows: list[dict[str, Any]],
                   multiclass: Path) -> dict[str, Any]:
    """The served model's own check against the pediatric model's check, on the RSNA films (each row gets its
    `pediatric` score and flag), the served model's own films and the Kermany films of the same split."""
    adult = load_served(args.adult_check, None, args.threads)
    for row, other in zip(rows, serve_films(adult, [Path(row["path"]) for row in rows], args.batch_size),
                          strict=True):
        row.update(pediatric=other["population"], pediatric_flagged=other["flagged"])
    kermany = multiclass.parent / "pneumonia" / args.split
    own = multiclass_films(multiclass, args.split) + \
        [(f"pneumonia/{args.split} {name} (Kermany)", path) for name in ("NORMAL", "PNEUMONIA")
         for path in image_files(kermany / name)]
    own_served = serve_films(served, [path for _, path in own], args.batch_size)
    own_other = serve_films(adult, [path for _, path in own], args.batch_size)
    table_rows = []
    for label, keep in [("all", lambda row: True), *((value, lambda row, v=value: row["label"] == v)
                                                     for value in ("OPACITY", "NO_OPACITY"))]:
        kept = [row for row in rows if keep(row)]
        table_rows.append(check_row(f"rsna {args.split}, {label}", kept, [row["pediatric_flagged"] for row in kept]))
    for group in sorted({group for group, _ in own}):
        mask = [g == group for g, _ in own]
        table_rows.append(check_row(group if group.startswith("pneumonia/") else f"multiclass {args.split}, {group}",
                                    [r for r, m in zip(own_served, mask, strict=True) if m],
                                    [r["flagged"] for r, m in zip(own_other, mask, strict=True) if m]))
    # adult films (RSNA, CRD adult normals, COVID-19, TBX11K) against pediatric ones (Kermany, and its copies in
    # multiclass/NORMAL; multiclass/PNEUMONIA is a copy of pneumonia/ and is left out), by the pediatric score
    child = [group.startswith("pneumonia/") or "Kermany" in group for group, _ in own]
    adult_films = [group != "PNEUMONIA" and not is_child for (group, _), is_child in zip(own, child, strict=True)]
    adult_scores = [row["pediatric"] for row in rows] + \
        [r["population"] for r, keep in zip(own_other, adult_films, strict=True) if keep]
    child_scores = [r["population"] for r, keep in zip(own_other, child, strict=True) if keep]
    auc = roc_auc(np.r_[np.ones(len(adult_scores)), np.zeros(len(child_scores))], np.r_[adult_scores, child_scores])
    multiclass_mask = [not group.startswith("pneumonia/") for group, _ in own]
    own_scores = [r["population"] for r, keep in zip(own_served, multiclass_mask, strict=True) if keep]
    own_auc = roc_auc(np.r_[np.ones(len(rows)), np.zeros(len(own_scores))],
                      np.r_[[row["population"] for row in rows], own_scores])
    leak = [row for row in rows if row["label"] == "OPACITY" and row.get("refused") is None
            and row["answer"] == "NORMAL" and not row["pediatric_flagged"]]
    opacity = sum(row["label"] == "OPACITY" for row in rows)
    return {"model": str(args.adult_check), "limit": adult.population.limit, "served_limit": served.population.limit,
            "table": table_rows, "auc_adult_vs_pediatric": auc, "auc_own_check_rsna_vs_own": own_auc,
            "highest_pediatric_score": float(max(child_scores)), "lowest_adult_score": float(min(adult_scores)),
            "opacity_normal_not_flagged_by_pediatric": {"n": len(leak), "of": opacity}}


def check_row(label: str, served_rows: Sequence[dict[str, Any]], pediatric_flags: Sequence[bool]) -> list[Any]:
    """One row of the check comparison: films, flagged by the served model's check, flagged by the pediatric one."""
    count = len(served_rows)
    own, other = sum(bool(row.get("flagged")) for row in served_rows), sum(bool(flag) for flag in pediatric_flags)
    return [label, count, f"{percent(own / count)} ({own})", f"{percent(other / count)} ({other})"]


def markdown(args: argparse.Namespace, result: dict[str, Any], names: Sequence[str]) -> str:
    groups = result["groups"]
    header = ["group", "films", "flagged (population check)", "refused by gate", "answered",
              *(f"answered {name} (share, mean p)" for name in names), "in multiclass/train"]
    lines = [f"# `{Path(args.checkpoint).parent.name}` on adult films: rsna/{args.split}", "",
             f"Written by `python -m training.adults` from `{args.checkpoint}`, served as the shipped handler "
             "serves it: gate on (refuses first), population check `refuse`. Flagged and refused shares are of "
             "all films of the row; the answered labels are the films neither refuses (share of those answered, "
             "mean top calibrated probability). In multiclass/train: RSNA films whose pixels are "
             "also a multiclass/train/NORMAL film (the model trained on them).", ""]
    rows = [["all", *summary_cells(groups["all"], names)]]
    for key, title in GROUPINGS:
        rows += [[f"{title}: {group.split('=', 1)[1]}", *summary_cells(value, names)]
                 for group, value in groups.items() if group.startswith(f"{key}=")]
    lines += table(header, rows)
    key = result["opacity_answered_normal"]
    lines += ["", f"**OPACITY films answered NORMAL with the population check letting them through: "
              f"{key['n']} of {key['of']} ({percent(key['share'])}, 95% CI {percent(key['ci95'][0])} - "
              f"{percent(key['ci95'][1])}).**", ""]
    check = result.get("adult_check")
    if check:
        leak = check["opacity_normal_not_flagged_by_pediatric"]
        lines += ["## Could a check the stack already has tell these films apart?", "",
                  f"Flagged = score above the check's limit: the served model's own check (limit "
                  f"{check['served_limit']:.4f}) and `{check['model']}`'s check (limit {check['limit']:.4f}, fitted "
                  "to flag films that are not Kermany children).", "",
                  *table(["films", "n", "flagged by the model's own check", "flagged by the pediatric check"],
                         check["table"]), "",
                  f"- pediatric check's score, adult films (RSNA, CRD adult normals, COVID-19, TBX11K) against "
                  f"Kermany pediatric films of this split: ROC AUC {check['auc_adult_vs_pediatric']:.3f} "
                  f"(highest pediatric score {check['highest_pediatric_score']:.4f}, lowest adult score "
                  f"{check['lowest_adult_score']:.4f})",
                  f"- the model's own check's score, RSNA films against its own multiclass films of this split: "
                  f"ROC AUC {check['auc_own_check_rsna_vs_own']:.3f}",
                  f"- OPACITY films answered NORMAL that the pediatric check does not flag either: "
                  f"{leak['n']} of {leak['of']}", ""]
    return "\n".join(lines)


def summary_cells(summary: dict[str, Any], names: Sequence[str]) -> list[Any]:
    return [summary["films"], percent(summary["flagged"]), percent(summary["gated"]), summary["answered"],
            *answer_cells(summary, names), summary["copies"]]


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    ran = run(args)
    text = markdown(args, ran["result"], ran["names"])
    films = [{key: row.get(key) for key in FILM_KEYS} for row in ran["rows"]]
    write_markdown_and_json(args.output, text, {**ran["result"], "films": films})
    print(text)
    return ran["result"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/cxr4/model.pt")
    parser.add_argument("--gate", default=str(SHIPPED_GATE), help="the gate checkpoint ('' for none)")
    parser.add_argument("--data", default=str(data_root() / "rsna"), help="a folder with manifest.csv")
    parser.add_argument("--split", default="test")
    parser.add_argument("--multiclass", default=str(data_root() / "multiclass"))
    parser.add_argument("--adult-check", default="models/pneumonia/model.pt",
                        help="a model whose population check flags non-pediatric films ('' to skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default="runs/adults/cxr4.md")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
