"""Fit the population check of a model of a user's own films (`make model`): whether a film is like the ones the
model was trained on, with no source names for the user's data.

    python -m training.own_population --checkpoint runs/model/adult/model.pt --name adult \\
        --data-tree runs/model/adult/tree --own-source rsna --output runs/model/adult/checked.pt

Own films: the ImageFolder tree `data_tree/{train,val,test}/<CLASS>/<film>`; the limit is the highest of the 99th
percentiles of each class's scores on own val. Negatives: every source of the data root's catalog
(training.population_data) but the user's own (`own_source`: its source or folder name) and multiclass PNEUMONIA
(copies of pneumonia/), training split only; and every image under each folder of `others` (source = the folder's
name; no splits there, so a seeded 70% is fitted against, reported as "train", and the other 30% only reported, as
"test"). A source that shares films with the user's data (at least SAME_SOURCE_SHARE of its films are copies of
own films, by thumbnail) is the user's own population: never a negative, reported as "same source"; single copies
in other sources are dropped. Candidates, fitting, choice and leave-one-source-out are training.fit_population's;
the report is training.population_report's.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.commands import command_parser
from cxr.data import image_files
from cxr.paths import data_root as default_data_root
from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint, write_checkpoint
from cxr_core.population import CHECKPOINT_KEY
from cxr_core.preprocessing import EvalPreset
from training.fit_population import (
    MAX_OWN_VAL_FLAGGED,
    RULE,
    FitSet,
    checkpoint_entry,
    choose,
    compare,
    flagged,
    leave_each_out,
    model_says,
    scores,
)
from training.population_data import (
    SAME_SOURCE_SHARE,
    SPLITS,
    Film,
    cached_features,
    catalog,
    copies,
    same_origin,
    thumbnails,
)
from training.population_report import percent, write_report

OWN = "own"
OTHERS_FIT_SHARE = 0.7
OTHERS_SEED = 0


def own_films(data_tree: Path) -> list[Film]:
    return [Film(path, OWN, split, path.parent.name, "own")
            for split in SPLITS for path in image_files(Path(data_tree) / split, "*/*")]


def other_films(folder: Path, seed: int = OTHERS_SEED) -> list[Film]:
    """Every image under `folder`, recursively, as source `folder.name`: a seeded OTHERS_FIT_SHARE "train"
    (fitted against), the rest "test" (reported only)."""
    paths = image_files(folder, "**/*")
    rank = np.random.default_rng(seed).permutation(len(paths))
    fitted = round(OTHERS_FIT_SHARE * len(paths))
    return [Film(path, folder.name, "train" if r < fitted else "test", folder.name, "others")
            for path, r in zip(paths, rank, strict=True)]


def candidate_negatives(data_root: Path | None, own_source: str | None, others: Sequence[Path]) -> list[Film]:
    """The catalog's films but the user's (`own_source`: a source or a folder of the data root, as `rsna` or
    `pneumonia`) and multiclass PNEUMONIA (copies of pneumonia/), then `others`."""
    films: list[Film] = []
    if data_root is not None and Path(data_root).is_dir():
        found = catalog(Path(data_root))
        known = sorted({film.source for film in found} | {film.folder for film in found})
        if own_source is not None and own_source not in known:
            raise ValueError(f"own_source {own_source!r}: no such source or folder under {data_root}; known: "
                             f"{', '.join(known)}")
        films = [film for film in found if own_source not in (film.source, film.folder)
                 and not (film.source == "kermany" and film.folder == "multiclass")]
    taken = {OWN, *(film.source for film in films)}
    for folder in map(Path, others):
        if folder.name in taken:
            raise ValueError(f"{folder}: a source named {folder.name!r} is already there; rename the folder")
        taken.add(folder.name)
        films += other_films(folder)
    return films


@dataclass(frozen=True)
class Screened:
    """The candidate negatives after comparing them with the user's films."""

    films: list[Film]  # what is kept: negatives and same-source films, copies of own films dropped
    population: dict[str, str]  # source -> "other" or "same source"
    thumbs: dict[str, np.ndarray]  # source -> its kept films' thumbnails
    excluded: dict[str, dict[str, Any]]  # same source -> films, share that are copies of own films
    dropped: dict[str, int]  # other source -> copies of own films left out


def screen(own: list[Film], candidates: list[Film]) -> Screened:
    """Sources with >= SAME_SOURCE_SHARE of their films among the user's are "same source"; elsewhere the single
    copies of own films are dropped."""
    own_thumbs = thumbnails([film.path for film in own], "own thumbnails")
    thumbs = thumbnails([film.path for film in candidates], "other thumbnails")
    copied = copies(thumbs, own_thumbs)
    source_of = np.asarray([film.source for film in candidates])
    keep = np.ones(len(candidates), dtype=bool)
    population, excluded, dropped = {}, {}, {}
    for source in dict.fromkeys(source_of.tolist()):
        mine = source_of == source
        share = float(copied[mine].mean())
        if share >= SAME_SOURCE_SHARE:
            population[source] = "same source"
            excluded[source] = {"films": int(mine.sum()), "copies_of_own": int(copied[mine].sum()),
                                "share": share}
        else:
            population[source] = "other"
            keep &= ~(mine & copied)
            if copied[mine].any():
                dropped[source] = int(copied[mine].sum())
    return Screened([film for film, k in zip(candidates, keep, strict=True) if k], population,
                    {source: thumbs[keep & (source_of == source)] for source in population}, excluded, dropped)


def fit_own_check(checkpoint_path: Path, *, name: str, data_tree: Path, data_root: Path | None,
                  others: Sequence[Path] = (), own_source: str | None, output: Path, report_dir: Path,
                  intended_population: str, model_card: str, threads: int = 2) -> dict[str, Any]:
    """Fit, choose and report the check of the model at `checkpoint_path`; write a copy carrying it to `output`
    and the report to `report_dir`/population.{md,json}. Returns the report's summary."""
    torch.set_num_threads(threads)
    checkpoint = load_checkpoint(checkpoint_path)
    model, config = model_from_checkpoint(checkpoint), ServingConfig.from_checkpoint(checkpoint)
    own = own_films(Path(data_tree))
    if not any(film.split == "train" for film in own) or not any(film.split == "val" for film in own):
        raise ValueError(f"{data_tree}: need train/<CLASS>/ and val/<CLASS>/ films for a population check")
    screened = screen(own, candidate_negatives(data_root, own_source, others))
    population = {OWN: "own", **screened.population}
    films = own + screened.films
    print(f"{len(own)} own films; same source: {', '.join(screened.excluded) or 'none'}; "
          f"copies of own films dropped: {sum(screened.dropped.values())}")
    logits, features = cached_features(model, films, EvalPreset(config.preprocessing),
                                       Path(output).parent / "features.npz", Path(checkpoint_path),
                                       "cuda" if torch.cuda.is_available() else "cpu")

    def is_negative(film: Film) -> bool:
        return population[film.source] == "other" and film.split == "train"

    negatives = np.asarray([is_negative(film) for film in films], dtype=bool)
    labels = sorted({film.label for film in own})

    def own_split(split: str, label: str | None = None) -> np.ndarray:
        return features[np.asarray([f.source == OWN and f.split == split and label in (None, f.label)
                                    for f in films], dtype=bool)]

    own_set = FitSet(own_split("train"), [own_split("val", label) for label in labels], features[negatives])
    fitted_sources = list(dict.fromkeys(f.source for f, n in zip(films, negatives, strict=True) if n))
    origins = same_origin({source: screened.thumbs[source] for source in fitted_sources})
    rows = compare(model, own_set, leave_each_out(films, features, own_set, fitted_sources, origins, is_negative))
    source_of = np.asarray([film.source for film in films])
    known_val = {source: features[(source_of == source) & np.asarray([f.split == "val" for f in films])]
                 for source in fitted_sources}
    for row in rows.values():
        row["known"] = {source: flagged(row["check"], found) for source, found in known_val.items() if len(found)}
    chosen = choose_own(rows)
    check = rows[chosen]["check"]
    for source, facts in screened.excluded.items():
        facts["flagged"] = flagged(check, features[source_of == source])
    extra = {"excluded_sources": screened.excluded, "dropped_copies": screened.dropped,
             "negatives": {source: int((negatives & (source_of == source)).sum()) for source in fitted_sources},
             "same_origin": {source: sorted(shared) for source, shared in origins.items() if len(shared) > 1},
             "others_split": f"{OTHERS_FIT_SHARE:.0%} fitted ('train'), the rest reported ('test'), seed {OTHERS_SEED}"}
    known = "; ".join(f"{name}: {percent(float(np.mean(list(row['known'].values()))))}" for name, row in rows.items()
                      if row["known"])
    notes = [OWN_RULE, f"Known sources' val films flagged, mean per candidate: {known or 'none'}.",
             negatives_note(extra, own_source)]
    report = write_report(name, films, scores(check, features), check["limit"], model_says(config, logits), rows,
                          chosen, lambda film: population[film.source], report_dir, stem="population",
                          command="training.own_population", notes=notes, extra=extra)
    write_checkpoint(output, {**checkpoint, CHECKPOINT_KEY: checkpoint_entry(
        check, chosen, intended_population, model_card, report["summary"])})
    print(f"wrote {output} with the check {chosen!r} (limit {check['limit']:.4f}); report in {report_dir}")
    return report["summary"]


OWN_RULE = ("The shipped candidate is chosen on train/val figures only, among those flagging at most "
            f"{MAX_OWN_VAL_FLAGGED:.1%} of the own validation films: the highest mean of two shares, the other "
            "sources' val films flagged (the known sources, fitted against: what the model will meet from them) and "
            "the leave-one-source-out share "
            "(train+val: a source it was not fitted against); with no other source, " + RULE.split("without ")[-1])


def choose_own(rows: dict[str, dict[str, Any]]) -> str:
    """OWN_RULE. A model of a user's films faces the known sources of the data root (children, for an adult
    model) as much as unseen ones, so both count; the pediatric and 4-class checks use `choose` alone."""
    if not any(row["known"] for row in rows.values()):
        return choose(rows)
    allowed = {name: row for name, row in rows.items() if row["own_val"] <= MAX_OWN_VAL_FLAGGED} or rows

    def merit(row: dict[str, Any]) -> float:
        unseen = [value["train+val"] for value in row["loso"].values() if np.isfinite(value["train+val"])]
        return float(np.mean(list(row["known"].values())) + (np.mean(unseen) if unseen else 0.0))

    return max(allowed, key=lambda name: merit(allowed[name]))


def negatives_note(extra: dict[str, Any], own_source: str | None) -> str:
    """The report's paragraph on what was fitted against and what was not."""
    fitted = ", ".join(f"{source} {count}" for source, count in extra["negatives"].items()) or "none (one class)"
    same = "; ".join(f"{source}: {facts['copies_of_own']} of {facts['films']} films are copies of own films, "
                     f"{percent(facts['flagged'])} flagged" for source, facts in extra["excluded_sources"].items())
    dropped = ", ".join(f"{source} {count}" for source, count in extra["dropped_copies"].items())
    origin = "; ".join(f"{source} with {', '.join(s for s in shared if s != source)}"
                       for source, shared in extra["same_origin"].items())
    return (f"Negatives (training films fitted against): {fitted}. The user's source in the data root: "
            f"{own_source or 'none'}. Same source as the user's films (at least 1% of a source's films are copies "
            f"of own films, by 32x32 thumbnails), never negatives: {same or 'none'}. Single copies of own films "
            f"dropped: {dropped or 'none'}. Folders given as others: {extra['others_split']}. Left out together in "
            f"leave-one-source-out (they share films): {origin or 'none'}.")


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--data-tree", required=True, help="train/val/test/<CLASS>/ folders of the user's films")
    parser.add_argument("--data-root", default=str(default_data_root()), help="'' for none")
    parser.add_argument("--others", nargs="*", default=[], help="folders of other sources' films")
    parser.add_argument("--own-source", default=None, help="the user's source in the data root's catalog")
    parser.add_argument("--output", required=True)
    parser.add_argument("--report-dir", default=None, help="default: beside --output")
    parser.add_argument("--intended-population", required=True, help="one line: whom the model is for")
    parser.add_argument("--model-card", required=True, help="where a refusal says the model card is")
    parser.add_argument("--threads", default=2, type=int)
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    summary = fit_own_check(Path(args.checkpoint), name=args.name, data_tree=Path(args.data_tree),
                            data_root=Path(args.data_root) if args.data_root else None,
                            others=[Path(folder) for folder in args.others], own_source=args.own_source,
                            output=Path(args.output), report_dir=Path(args.report_dir or Path(args.output).parent),
                            intended_population=args.intended_population, model_card=args.model_card,
                            threads=args.threads)
    print(json.dumps({key: summary[key] for key in ("method", "limit", "loso", "excluded_sources")}, indent=2))
