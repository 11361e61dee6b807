"""Fit a model's population check (cxr_core.population), choose it on train/val only, report it per source and
split (with leave-one-source-out figures), and write a copy of the checkpoint that carries it.

    python -m training.fit_population --checkpoint models/pneumonia/model.pt \\
        --output runs/population-pneumonia/model.pt --report-dir docs/population

The pneumonia model (trained on Kermany) is told apart from the other sources' *training* films (CRD Normal
without its Kermany copies, CRD COVID-19, TBX11K, RSNA adults) by a logistic layer. cxr4 (trained on all of
multiclass/) has no other source among its training data and gets a one-class check; with
`--rsna-findings-negatives` it is told apart from the adult films with findings it was never trained on instead,
the RSNA training films of the classes `RSNA_FINDINGS` (measured, not shipped: docs/model_cards/cxr4.md). Either
way the RSNA films with findings of val and test are reported as held out, and the RSNA "Normal" films as its
own population's source (its NORMAL class holds RSNA normals: never negatives). The limit is the highest of the
99th percentiles of each class's scores on the model's own validation films. Candidates are compared by rules
fixed here (`choose`), on train/val figures only; the test splits are reported once. Leave-one-source-out leaves
a source out together with the sources it shares films with (`same_origin`: CRD Normal and RSNA are one origin).
training/own_population.py fits a user's own model with the same pieces.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from cxr.commands import command_parser
from cxr.paths import data_root
from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint, write_checkpoint
from cxr_core.decision import calibrated_probabilities
from cxr_core.population import CHECKPOINT_KEY, TAPS, check_tensors, outside, population_score
from cxr_core.preprocessing import EvalPreset
from training.population_data import (
    RSNA_FINDINGS,
    Film,
    cached_features,
    catalog,
    same_origin,
    thumbnails,
    with_rsna_classes,
)
from training.population_report import write_report

ACCEPT_OWN_VAL = 0.99  # the limit: the highest of each own validation class's quantile at this share
MAX_OWN_VAL_FLAGGED = 0.015  # `choose`: candidates flagging more of the own validation films are not shipped
# `choose` without leave-one-source-out figures to rank by (a single source to fit against, or none): the
# candidates those figures chose for pneumonia (four other sources) and for cxr4 (one class).
DEFAULTS = ("logistic, layer1-4, C=1", "gaussian, layer3-4, 32 components")
RULE = ("The shipped candidate is chosen on train/val figures only: the highest mean leave-one-source-out share "
        f"flagged (train+val) among those flagging at most {100 * MAX_OWN_VAL_FLAGGED:.1f}% of the own validation "
        "films; without leave-one-source-out figures, " + " or, one class, ".join(f"`{d}`" for d in DEFAULTS) + ".")
RULE_HELD_OUT = ("The shipped candidate is chosen on train/val figures only: the highest share flagged of the RSNA "
                 "validation films with findings (`rsna findings`: lung opacity or other findings, never fitted on) "
                 f"among those flagging at most {100 * MAX_OWN_VAL_FLAGGED:.1f}% of the own validation films.")
INTENDED = {
    "pneumonia": "Frontal chest X-rays of children aged 1-5 from Guangzhou Women and Children's Medical Center "
                 "(Kermany et al. 2018); not adults, not other hospitals",
    "cxr4": "Frontal chest X-rays like its four training sources: COVID-19 Radiography Database (adult normal, "
            "COVID-19), Kermany pediatric pneumonia, TBX11K tuberculosis; not a general adult population",
}
OTHER_SOURCES = ("crd_normal", "crd_covid", "tbx11k", "rsna")


@dataclass(frozen=True)
class FitSet:
    """What one fit sees: own training films, own validation films per class (for the limit), negatives."""

    own_train: np.ndarray
    own_val: list[np.ndarray]
    negatives: np.ndarray


@dataclass(frozen=True)
class LeftOut:
    """A leave-one-source-out fit and the films of the source left out (its train+val, then its test)."""

    fit_set: FitSet
    train_val: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class HeldOut:
    """Films of a kind never fitted on, judged by the full fit: validation films (to choose by), then test films."""

    val: np.ndarray
    test: np.ndarray


def tap_columns(model: torch.nn.Module, taps: tuple[str, ...]) -> np.ndarray:
    """Boolean mask of the feature columns that belong to `taps` (each stage gives mean and std per channel)."""
    mask = []
    for name in TAPS:
        channels = getattr(model, name)[-1].conv2.out_channels if hasattr(getattr(model, name)[-1], "conv2") \
            else getattr(model, name)[-1].conv3.out_channels
        mask += [name in taps] * (2 * channels)
    return np.asarray(mask)


def fit_logistic(own: np.ndarray, other: np.ndarray, columns: np.ndarray, strength: float) -> dict[str, Any]:
    """p(another source) by a balanced logistic layer on standardised features; unused columns weigh 0."""
    features = np.concatenate([own, other])
    center, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    z = ((features - center) / scale)[:, columns]
    target = np.r_[np.zeros(len(own)), np.ones(len(other))]
    classifier = LogisticRegression(C=strength, class_weight="balanced", max_iter=5000).fit(z, target)
    weights = np.zeros((len(center), 1), dtype=np.float32)
    weights[columns, 0] = classifier.coef_[0]
    return {"kind": "logistic", "center": center, "scale": scale, "weights": weights,
            "bias": classifier.intercept_.astype(np.float32)}


def fit_gaussian(own: np.ndarray, columns: np.ndarray, components: int = 64) -> dict[str, Any]:
    """One class: the mean squared whitened principal components of the own training films (about 1 inside)."""
    center, scale = own.mean(axis=0), own.std(axis=0) + 1e-6
    z = ((own - center) / scale)[:, columns]
    _, singular, directions = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    keep = min(components, int((singular > 1e-6 * singular[0]).sum()))  # few films: no empty directions
    whitened = directions[:keep].T / (singular[:keep] / np.sqrt(len(z) - 1))
    weights = np.zeros((len(center), keep), dtype=np.float32)
    weights[columns] = whitened
    return {"kind": "gaussian", "center": center, "scale": scale, "weights": weights,
            "bias": np.zeros(1, dtype=np.float32)}


def scores(check: dict[str, Any], features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return population_score(torch.as_tensor(features, dtype=torch.float32), **check_tensors(check),
                                kind=check["kind"]).numpy()


def with_limit(check: dict[str, Any], own_val: list[np.ndarray]) -> dict[str, Any]:
    """The limit that accepts ACCEPT_OWN_VAL of each class of the own validation films (`own_val`: one array
    per class), so the check does not fall harder on one class than on another."""
    return {**check, "limit": max(float(np.quantile(scores(check, films), ACCEPT_OWN_VAL))
                                  for films in own_val if len(films))}


def candidates(model: torch.nn.Module, has_others: bool) -> dict[str, tuple[str, tuple[str, ...], float]]:
    """name -> (kind, taps, C or components)."""
    found = {"gaussian, layer1-4, 64 components": ("gaussian", TAPS, 64),
             "gaussian, layer3-4, 32 components": ("gaussian", ("layer3", "layer4"), 32)}
    if has_others:
        found = {"logistic, layer2-4, C=1": ("logistic", ("layer2", "layer3", "layer4"), 1.0),
                 "logistic, layer1-4, C=1": ("logistic", TAPS, 1.0),
                 "logistic, layer1-4, C=0.1": ("logistic", TAPS, 0.1),
                 "logistic, layer1-4, C=0.01": ("logistic", TAPS, 0.01), **found}
    return found


def fit(spec: tuple[str, tuple[str, ...], float], model: torch.nn.Module, films: FitSet) -> dict[str, Any]:
    kind, taps, parameter = spec
    columns = tap_columns(model, taps)
    check = fit_logistic(films.own_train, films.negatives, columns, parameter) if kind == "logistic" else \
        fit_gaussian(films.own_train, columns, int(parameter))
    return with_limit(check, films.own_val)


def flagged(check: dict[str, Any], features: np.ndarray) -> float:
    return float(outside(scores(check, features), check["limit"]).mean()) if len(features) else float("nan")


def compare(model: torch.nn.Module, films: FitSet, left_out: dict[str, LeftOut],
            held_out: dict[str, HeldOut] | None = None) -> dict[str, dict[str, Any]]:
    """Every candidate fitted on `films`: its share of own val flagged, its leave-one-source-out figures (NaN for
    a logistic candidate when leaving the source out leaves no negative) and, given `held_out`, the share it
    flags of each set of held-out films (val, test)."""
    rows = {}
    for label, spec in candidates(model, len(films.negatives) > 0).items():
        check = fit(spec, model, films)
        row = {"check": check, "own_val": flagged(check, np.concatenate(films.own_val)), "loso": {},
               "held_out": {name: {"val": flagged(check, held.val), "test": flagged(check, held.test)}
                            for name, held in (held_out or {}).items()}}
        for source, held in left_out.items():
            if spec[0] == "logistic" and not len(held.fit_set.negatives):
                row["loso"][source] = {"train+val": float("nan"), "test": float("nan")}
                continue
            loso = fit(spec, model, held.fit_set)
            row["loso"][source] = {"train+val": flagged(loso, held.train_val), "test": flagged(loso, held.test)}
        rows[label] = row
    return rows


def choose(rows: dict[str, dict[str, Any]], target: str | None = None) -> str:
    """The rule, on train/val figures only, among the candidates that flag at most MAX_OWN_VAL_FLAGGED of the own
    validation films: with `target` (a set of held-out films), the highest share of its validation films flagged;
    else the highest mean leave-one-source-out share flagged (train+val) over the sources every such candidate
    has a figure for; without any, the first of DEFAULTS allowed."""
    allowed = {name: row for name, row in rows.items() if row["own_val"] <= MAX_OWN_VAL_FLAGGED} or rows
    if target is not None:
        return max(allowed, key=lambda name: allowed[name]["held_out"][target]["val"])
    sources = [source for source in next(iter(allowed.values()))["loso"]
               if all(np.isfinite(row["loso"][source]["train+val"]) for row in allowed.values())]
    if not sources:
        return next((name for name in DEFAULTS if name in allowed), next(iter(allowed)))
    return max(allowed, key=lambda name: np.mean([allowed[name]["loso"][s]["train+val"] for s in sources]))


def model_says(config: ServingConfig, logits: np.ndarray) -> list[str]:
    """The served answer (class name) for each row of logits: calibrated, then decided."""
    return [config.class_names[int(k)] for k in config.decide(calibrated_probabilities(logits, config.temperature))]


def origins_of(films: list[Film], sources: list[str]) -> dict[str, frozenset[str]]:
    """`same_origin` of `sources`, from their films' thumbnails (the sharing is printed)."""
    origins = same_origin({source: thumbnails([f.path for f in films if f.source == source], f"{source} thumbnails")
                           for source in sources})
    for source, shared in origins.items():
        if len(shared) > 1:
            print(f"{source} shares films with {', '.join(sorted(shared - {source}))}: left out together")
    return origins


def leave_each_out(films: list[Film], features: np.ndarray, own: FitSet, sources: list[str],
                   origins: dict[str, frozenset[str]], is_fit: Callable[[Film], bool]) -> dict[str, LeftOut]:
    """Per negative source: fitted without it and its origin (`is_fit`: a film is a negative of the full fit),
    reported on its films outside the test split, then on its test split."""
    source_of, test = np.asarray([f.source for f in films]), np.asarray([f.split == "test" for f in films])
    fitted = np.asarray([is_fit(f) for f in films], dtype=bool)
    left_out = {}
    for source in sources:
        kept = fitted & ~np.isin(source_of, sorted(origins[source]))
        mine = source_of == source
        left_out[source] = LeftOut(FitSet(own.own_train, own.own_val, features[kept]), features[mine & ~test],
                                   features[mine & test])
    return left_out


def checkpoint_entry(check: dict[str, Any], method: str, intended_population: str, model_card: str,
                     summary: dict[str, Any]) -> dict[str, Any]:
    """The check as a checkpoint carries it under CHECKPOINT_KEY."""
    return {"kind": check["kind"], "taps": list(TAPS), "limit": check["limit"], **check_tensors(check),
            "intended_population": intended_population, "model_card": model_card, "method": method,
            "metrics": summary}


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    name = args.name or Path(args.checkpoint).parent.name
    model = model_from_checkpoint(checkpoint)
    config = ServingConfig.from_checkpoint(checkpoint)
    trained_on = "pneumonia" if len(config.class_names) == 2 else "multiclass"
    # Left out: for pneumonia, multiclass PNEUMONIA (copies of pneumonia/); for cxr4, pneumonia/ train and val
    # (its test split is the pediatric NORMAL source it is judged on).
    films = [film for film in catalog(Path(args.data_root))
             if not (trained_on == "pneumonia" and film.folder == "multiclass" and film.source == "kermany")
             and not (trained_on == "multiclass" and film.folder == "pneumonia" and film.split != "test")]
    if trained_on == "multiclass":  # its negatives and its own population among the RSNA films, by RSNA class
        films = with_rsna_classes(films, Path(args.data_root))
    is_own = (lambda f: f.source in ("kermany", "kermany_in_crd", "samples")) if trained_on == "pneumonia" \
        else (lambda f: f.folder == "multiclass")
    print(f"{len(films)} films; Kermany copies among CRD Normal: "
          f"{sum(f.source == 'kermany_in_crd' for f in films)} of "
          f"{sum(f.source in ('crd_normal', 'kermany_in_crd') for f in films)}")
    # The feature pass is the slow part: kept beside the output for re-fits.
    logits, features = cached_features(model, films, EvalPreset(config.preprocessing),
                                       Path(args.output).parent / "features.npz", Path(args.checkpoint), args.device)

    def pick(condition: Callable[[Film], bool]) -> np.ndarray:
        return np.asarray([condition(film) for film in films], dtype=bool)

    def own_val(leave: str | None = None) -> list[np.ndarray]:
        return [features[pick(lambda f, label=label: is_own(f) and f.source != leave and f.split == "val"
                              and f.label == label)] for label in config.class_names]

    own_train = features[pick(lambda f: is_own(f) and f.split == "train" and f.folder != "samples")]
    held_out: dict[str, HeldOut] = {}
    if trained_on == "pneumonia":
        def is_negative(film: Film) -> bool:
            return film.source in OTHER_SOURCES and film.split == "train"

        own = FitSet(own_train, own_val(), features[pick(is_negative)])
        left_out = leave_each_out(films, features, own, list(OTHER_SOURCES), origins_of(films, list(OTHER_SOURCES)),
                                  is_negative)
    else:  # one class, or RSNA films with findings as negatives; leave one own source out of the fit and its limit
        def rsna(classes: tuple[str, ...], split: str) -> np.ndarray:
            return pick(lambda f: f.folder == "rsna" and f.label in classes and f.split == split)

        negatives = rsna(RSNA_FINDINGS, "train") if args.rsna_findings_negatives else np.zeros(len(films), bool)
        own = FitSet(own_train, own_val(), features[negatives])
        held_out = {name: HeldOut(features[rsna(classes, "val")], features[rsna(classes, "test")])
                    for name, classes in (("rsna findings", RSNA_FINDINGS), ("rsna Normal", ("Normal",)))}
        test = pick(lambda f: f.split == "test")
        left_out = {}
        for source in ("crd_normal", "crd_covid", "tbx11k", "kermany"):
            mine = pick(lambda f, s=source: f.source == s and is_own(f))
            kept = features[pick(lambda f, s=source: is_own(f) and f.source != s and f.split == "train")]
            left_out[source] = LeftOut(FitSet(kept, own_val(source), own.negatives), features[mine & ~test],
                                       features[mine & test])

    def population_of(film: Film) -> str:
        if is_own(film):
            return "own"
        return "same source" if trained_on == "multiclass" and film.folder == "rsna" and film.label == "Normal" \
            else "other"

    rows = compare(model, own, left_out, held_out)
    target = "rsna findings" if trained_on == "multiclass" and args.rsna_findings_negatives else None
    chosen = choose(rows, target)
    check = rows[chosen]["check"]
    report = write_report(name, films, scores(check, features), check["limit"], model_says(config, logits), rows,
                          chosen, population_of, args.report_dir, notes=[RULE_HELD_OUT if target else RULE])
    stored = checkpoint_entry(check, chosen, INTENDED.get(name, args.intended_population or ""),
                              f"docs/model_cards/{name}.md", report["summary"])
    write_checkpoint(args.output, {**checkpoint, CHECKPOINT_KEY: stored})
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.output} with the check {chosen!r} (limit {check['limit']:.4f})")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt")
    parser.add_argument("--name", default=None, help="model name (default: the checkpoint's folder name)")
    parser.add_argument("--data-root", default=str(data_root()))
    parser.add_argument("--output", required=True, help="the checkpoint with its check (the input stays)")
    parser.add_argument("--report-dir", default="runs/reports/population")
    parser.add_argument("--intended-population", default=None, help="one line: whom the model is for")
    parser.add_argument("--rsna-findings-negatives", action="store_true",
                        help="cxr4: fit against the RSNA training films with findings instead of one class")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default=2, type=int)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())

