"""Check a user's labelled X-rays before `make model` trains anything, and plan the splits.

    python -m training.own_data --data ../shared/data/rsna --name adult --positive OPACITY

Layouts: `train/ val/ test/` of `<CLASS>/<images>`; `<CLASS>/<images>` without splits; DICOM (or image) files
with one labels CSV at the top (`file,label[,patient]`, `file` relative to the folder). Without splits the films
are split here, seeded and stratified 70/15/15, by patient where patient ids are known (the CSV's `patient`
column, or a `manifest.csv` with `file` and `patient` columns as the shared data sets have them).

Every problem is found here, before hours of training, as one DataError line naming the problem and the fix.
Every film is decoded as serving decodes it and scored by the gate: under 1% failing are left out and listed;
more stops the plan, since then the folder holds something else than the user thinks.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.data import IMAGE_EXTENSIONS
from cxr.paths import SHIPPED_GATE
from cxr_core.gate import OodGate
from cxr_core.preprocessing import EvalPreset, PreprocessConfig
from cxr_core.variants import VARIANTS

SPLITS = ("train", "val", "test")
FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
DICOM_EXTENSIONS = (".dcm", ".dicom")
SERVED_MODELS = ("pneumonia", "cxr4", "adult")
MANIFEST = "manifest.csv"
MAX_BAD_SHARE = 0.01  # unreadable or non-X-ray files: left out below this share of all files, a stop at or above
MAX_FILE_BYTES = 200_000_000  # a film is a few MB at most; a bigger file is something else, never read whole
CHECK_SIZE = 128  # the decode check's input side: enough for the gate's 64 px thumbnail, cheap to make
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,39}")
SHOWN = 10  # files named in one error line (five times as many in the printed plan)
NOT_AN_IMAGE = "not an image file"

LAYOUTS = {"split_folders": "ImageFolder with train/ val/ test/ splits",
           "class_folders": "ImageFolder without splits (<CLASS>/<images>)",
           "csv_labels": "files with a labels CSV (file,label[,patient])"}


class DataError(ValueError):
    """A problem with the user's data, in one line that says what is wrong and what to do about it."""


class Film(NamedTuple):
    path: Path
    label: int  # index into DataPlan.class_names
    patient: str | None


class LeftOut(NamedTuple):
    path: Path
    reason: str


@dataclass(frozen=True)
class DataPlan:
    """What training will read: the films of each split, and what was left out and why."""

    data: Path
    name: str
    layout: str  # a key of LAYOUTS
    class_names: tuple[str, ...]
    positive_class: str | None  # the class the threshold is for; None for multi-class argmax
    splits: dict[str, list[Film]]  # train, val, test
    left_out: list[LeftOut]
    split_rule: str  # one sentence: how the splits were made
    gate_checked: bool  # False when the gate file was not there: films were decoded, not gated
    check_seconds: float  # the decode + gate pass


class _Labelled(NamedTuple):  # one film as found, before class indices and splits are settled
    path: Path
    label: str
    patient: str | None
    split: str | None  # given by the folders, else None


def check_name(name: str, served: Iterable[str] = SERVED_MODELS) -> None:
    """The model name becomes file names (`<name>.mar`) and URLs (`/predictions/<name>`), and `_ts`-style suffixes
    name the variant archives: a name that collides with either would replace or shadow another model."""
    if not NAME_PATTERN.fullmatch(name):
        raise DataError(f"NAME={name!r} is not a plain name: use 1-40 lowercase letters, digits, _ or -, starting "
                        "with a letter (e.g. NAME=adult)")
    if name in set(served):
        raise DataError(f"NAME={name} is a model already served ({', '.join(served)}): choose another name")
    suffix = next((f"_{variant}" for variant in VARIANTS if name.endswith(f"_{variant}")), None)
    if suffix:
        raise DataError(f"NAME={name} ends with the variant suffix {suffix} (variant archives are named "
                        f"<name>{suffix}): choose a name without it")


def _is_film(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS and path.is_file()


def _visible(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith((".", "__")))


def detect_layout(data: Path) -> str:
    """Which of the three layouts `data` is; DataError when it is none of them."""
    if not data.is_dir():
        raise DataError(f"{data} is not a folder: pass DATA=<folder> holding your labelled X-rays")
    present = [split for split in SPLITS if (data / split).is_dir()]
    if present:
        missing = [split for split in SPLITS if split not in present]
        if missing:
            raise DataError(f"{data}: split folder {', '.join(s + '/' for s in missing)} missing (found "
                            f"{', '.join(s + '/' for s in present)}): add it with one folder per class, or move all "
                            "films into <CLASS>/ folders at the top and the split is made for you")
        return "split_folders"
    table = _labels_table(data)
    class_folders = any(entry.is_dir() and any(map(_is_film, entry.iterdir())) for entry in _visible(data))
    if table is not None and (table.name != MANIFEST or not class_folders):
        return "csv_labels"
    if class_folders:
        return "class_folders"
    raise DataError(f"{data} holds no labelled X-rays: put one folder per class in it (<CLASS>/<images>), or "
                    "train/ val/ test/ folders of class folders, or DICOM files with one labels CSV "
                    "(file,label[,patient])")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows = [{key.strip().lower(): (value or "").strip() for key, value in row.items() if key} for row in reader]
        return [name.strip().lower() for name in reader.fieldnames or []], rows


def manifest_patients(data: Path) -> dict[str, str] | None:
    """{path relative to `data`: patient} from a manifest.csv with `file` (or `path`) and `patient` columns."""
    columns, rows = _read_csv(data / MANIFEST) if (data / MANIFEST).is_file() else ([], [])
    column = next((c for c in ("file", "path") if c in columns), None)
    if column is None or "patient" not in columns:
        return None
    return {Path(row[column]).as_posix(): row["patient"] for row in rows if row[column] and row["patient"]}


def folder_films(data: Path, layout: str) -> tuple[list[_Labelled], list[LeftOut]]:
    """Layouts 1 and 2 (`<split>/<CLASS>/` or `<CLASS>/`), with patients from manifest.csv when it has them.
    Files there that are no image are left out: they count as bad files, since they sit where films should be.
    Every split must hold every class (a class absent from val or test cannot be evaluated). Without splits, a
    film the manifest does not name would be split blindly, perhaps putting its patient on both sides: an error."""
    patients = manifest_patients(data)
    films, others = [], []
    for split in SPLITS if layout == "split_folders" else (None,):
        for class_dir in (entry for entry in _visible(data / (split or "")) if entry.is_dir()):
            for path in (entry for entry in _visible(class_dir) if entry.is_file()):
                if not _is_film(path):
                    others.append(LeftOut(path, f"{NOT_AN_IMAGE} ({path.suffix or 'no extension'})"))
                    continue
                patient = patients.get(path.relative_to(data).as_posix()) if patients is not None else None
                films.append(_Labelled(path, class_dir.name, patient, split))
    classes = sorted({film.label for film in films})
    for split, name in ((split, name) for split in SPLITS for name in classes if layout == "split_folders"):
        if not any(film.split == split and film.label == name for film in films):
            raise DataError(f"{data}: class {name} has no films in {split}/ (classes: {', '.join(classes)}): "
                            f"add {name} films to {split}/{name}/, or remove {name} from every split")
    if layout == "class_folders":
        others += [LeftOut(path, "not in a class folder") for path in _visible(data) if _is_film(path)]
        if patients is not None:
            _refuse_any([film.path.relative_to(data).as_posix() for film in films if film.patient is None],
                        f"films have no patient in {data / MANIFEST}",
                        "add their rows (file relative to the folder, patient), or drop its patient column")
    return films, others


def _labels_table(data: Path) -> Path | None:
    """The labels CSV at the top of `data`: any CSV but the data sets' own manifest.csv, or that manifest when
    it is the only CSV; DataError when there are several."""
    tables = [entry for entry in _visible(data) if entry.is_file() and entry.suffix.lower() == ".csv"]
    chosen = [table for table in tables if table.name != MANIFEST] or tables
    if len(chosen) > 1:
        raise DataError(f"{data}: {len(chosen)} CSV files at the top ({_some([t.name for t in chosen])}): keep "
                        "exactly one, with columns file,label[,patient]")
    return chosen[0] if chosen else None


def _refuse_any(problems: Sequence[str], what: str, fix: str) -> None:
    if problems:
        raise DataError(f"{len(problems)} {what} ({_some(problems)}): {fix}")


def csv_films(data: Path) -> tuple[list[_Labelled], list[LeftOut]]:
    """Layout 3: the labels CSV is the truth; files it does not name are left out (listed), rows that name no
    file are an error (a typo there would silently shrink a class)."""
    table = _labels_table(data)
    columns, rows = _read_csv(table)
    if "file" not in columns or "label" not in columns:
        raise DataError(f"{table}: columns {', '.join(columns) or 'none'}; it needs file,label[,patient]: rename the "
                        "header (file: the path relative to the folder, label: the class)")
    by_patient = "patient" in columns
    required = ("file", "label", "patient") if by_patient else ("file", "label")
    _refuse_any([row["file"] or f"row {line}" for line, row in enumerate(rows, 2) if not all(map(row.get, required))],
                f"rows of {table} with no {' or no '.join(required)}", "fill them in or remove those rows")
    _refuse_any([name for name, count in Counter(row["file"] for row in rows).items() if count > 1],
                f"files listed more than once in {table}", "keep one row each")
    _refuse_any([row["file"] for row in rows if Path(row["file"]).is_absolute() or ".." in Path(row["file"]).parts
                 or not (data / row["file"]).is_file()],
                f"labels in {table} name no file in {data}",
                "fix the file column (paths relative to the folder) or remove those rows")
    films = [_Labelled(data / row["file"], row["label"], row["patient"] if by_patient else None, None)
             for row in rows]
    named = {film.path.resolve() for film in films}
    others = [LeftOut(path, f"not in {table.name}") for path in sorted(data.rglob("*"))
              if _is_film(path) and path.resolve() not in named
              and not any(part.startswith(".") for part in path.relative_to(data).parts)]
    return films, others


def _some(items: Sequence[object]) -> str:
    shown = ", ".join(str(item) for item in items[:SHOWN])
    return shown + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def check_classes(data: Path, class_names: Sequence[str], positive: str | None) -> None:
    """Two classes at least, and the class the threshold is for named when there are two: guessing it would set
    the operating point (recall-first) on the wrong class."""
    if len(class_names) < 2:
        raise DataError(f"{data}: one class only ({', '.join(class_names)}): a model needs two or more; add a "
                        "folder (or labels) for each class")
    if positive is not None and positive not in class_names:
        raise DataError(f"POSITIVE={positive} is not a class of {data}: use one of {', '.join(class_names)}")
    if positive is None and len(class_names) == 2:
        raise DataError(f"binary data set: name the positive class with POSITIVE=<one of {', '.join(class_names)}>")


def check_counts(data: Path, films: Sequence[_Labelled], min_per_class: int) -> None:
    for name, count in sorted(Counter(film.label for film in films).items()):
        if count < min_per_class:
            raise DataError(f"{data}: class {name} has {count} films, fewer than {min_per_class}: add at least "
                            f"{min_per_class - count} more {name} films, or leave the class out")


def screen_files(paths: Sequence[Path], gate_path: Path | None, batch_size: int = 64) -> list[LeftOut]:
    """Decode every file as serving will (DICOM included) and score it with the gate, in batches (one by one
    costs 4x more): a file that serving would refuse must not be trained on."""
    config = PreprocessConfig(image_size=CHECK_SIZE)
    preset, mean, std = EvalPreset(config), config.mean[0], config.std[0]
    gate = OodGate.load(gate_path) if gate_path is not None and gate_path.is_file() else None
    refused, pending = [], []
    for number, path in enumerate(tqdm(paths, desc="decode + gate", unit="film"), 1):
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"over {MAX_FILE_BYTES // 1_000_000} MB, no X-ray film")
            tensor = preset.load(path.read_bytes())
            pending += [(path, tensor)] if gate is not None else []
        except Exception as error:  # noqa: BLE001 - whatever a file does wrong, it is listed, not a crash
            refused.append(LeftOut(path, f"unreadable: {error}"))
        if pending and (len(pending) == batch_size or number == len(paths)):
            scores = gate.scores(torch.stack([tensor for _, tensor in pending]), mean, std).tolist()
            refused += [LeftOut(item, f"not a chest X-ray (gate score {score:.2f} > limit {gate.limit:.2f})")
                        for (item, _), score in zip(pending, scores, strict=True) if score > gate.limit]
            pending.clear()
    return refused


def split_films(films: Sequence[_Labelled], seed: int) -> dict[str, list[_Labelled]]:
    """Seeded, stratified 70/15/15. Films of one patient stay together: patients (or single films) are shuffled
    within their class (a patient's most frequent label) and dealt out in order until each split has its share."""
    groups: dict[str, list[_Labelled]] = defaultdict(list)
    for index, film in enumerate(films):
        groups[film.patient if film.patient is not None else f"\0film{index}"].append(film)
    strata: dict[str, list[list[_Labelled]]] = defaultdict(list)
    for key in sorted(groups):
        labels = Counter(film.label for film in groups[key])
        strata[min(labels, key=lambda label: (-labels[label], label))].append(groups[key])
    rng = random.Random(seed)
    splits: dict[str, list[_Labelled]] = {split: [] for split in SPLITS}
    for label in sorted(strata):
        members = strata[label]
        rng.shuffle(members)
        total = sum(len(group) for group in members)
        n_val, n_test = round(total * FRACTIONS["val"]), round(total * FRACTIONS["test"])
        bounds = (total - n_val - n_test, total - n_test)
        for group, start in zip(members, accumulate(map(len, members), initial=0), strict=False):
            splits["train" if start < bounds[0] else "val" if start < bounds[1] else "test"] += group
    return {split: sorted(members) for split, members in splits.items()}


def plan_data(data: Path, *, name: str, positive: str | None, seed: int = 0, min_per_class: int = 20,
              gate_path: Path | None = SHIPPED_GATE, served: Iterable[str] = SERVED_MODELS) -> DataPlan:
    """Check `data` and plan the splits; DataError (one line, with the fix) on any problem. The cheap checks run
    first, so a wrong name or a missing class stops at once, before the decode pass."""
    data = Path(data)
    check_name(name, served)
    layout = detect_layout(data)
    films, others = csv_films(data) if layout == "csv_labels" else folder_films(data, layout)
    if not films:
        raise DataError(f"{data} holds no X-ray films: add them ({LAYOUTS[layout]}) or point DATA at their folder")
    class_names = tuple(sorted({film.label for film in films}))
    check_classes(data, class_names, positive)
    check_counts(data, films, min_per_class)
    started = time.perf_counter()
    refused = screen_files([film.path for film in films], gate_path)
    check_seconds = time.perf_counter() - started
    non_images = [other for other in others if other.reason.startswith(NOT_AN_IMAGE)]
    bad, total = sorted(refused + non_images), len(films) + len(non_images)
    if bad and len(bad) >= MAX_BAD_SHARE * total:
        raise DataError(f"{data}: {len(bad)} of {total} files ({len(bad) / total:.1%}) are unreadable or not chest "
                        f"X-rays: {_some([f'{b.path.relative_to(data)} ({b.reason})' for b in bad])}: remove or "
                        f"replace them (under {MAX_BAD_SHARE:.0%} of the files, they would be left out and listed)")
    dropped = {item.path for item in refused}
    films = [film for film in films if film.path not in dropped]
    check_counts(data, films, min_per_class)
    grouped, rule = _split(data, layout, films, class_names, seed)
    index = {label: position for position, label in enumerate(class_names)}
    splits = {split: [Film(film.path, index[film.label], film.patient) for film in members]
              for split, members in grouped.items()}
    return DataPlan(data=data, name=name, layout=layout, class_names=class_names, positive_class=positive,
                    splits=splits, left_out=sorted({*refused, *others}), split_rule=rule,
                    gate_checked=gate_path is not None and gate_path.is_file(), check_seconds=check_seconds)


def _split(data: Path, layout: str, films: list[_Labelled], class_names: Sequence[str], seed: int,
           ) -> tuple[dict[str, list[_Labelled]], str]:
    """The films of each split and the sentence that says how they were made."""
    if layout == "split_folders":
        grouped = {split: [film for film in films if film.split == split] for split in SPLITS}
        splits_of = Counter(patient for patient, _ in {(film.patient, film.split) for film in films if film.patient})
        shared = sum(count > 1 for count in splits_of.values())
        return grouped, "splits as given: the train/ val/ test/ folders" + (
            f" ({MANIFEST} puts {shared} patients in more than one split: the data as given)" if shared else "")
    grouped = split_films(films, seed)
    for split, members in grouped.items():
        missing = [name for name in class_names if name not in {film.label for film in members}]
        if missing:
            raise DataError(f"{data}: the {split} split got no {', '.join(missing)} films (too few patients for a "
                            "70/15/15 split): add films of more patients to those classes")
    patients = {film.patient for film in films}
    column = f"the {'CSV' if layout == 'csv_labels' else MANIFEST} patient column"
    how = (f"by patient ({len(patients)} patients from {column}, each in one split)" if None not in patients
           else "by film (no patient ids, so one patient's films may be on both sides)")
    return grouped, f"split here {how}, seeded (seed {seed}) and stratified by class, 70/15/15 of the films"


def split_counts(plan: DataPlan) -> dict[str, list[int]]:
    """Films per split and class (in class_names order)."""
    return {split: [sum(film.label == label for film in films) for label in range(len(plan.class_names))]
            for split, films in plan.splits.items()}


def describe(plan: DataPlan) -> str:
    """The plan as the user reads it before training starts."""
    width = max(len(name) for name in plan.class_names)
    lines = [f"data {plan.data}: {LAYOUTS[plan.layout]}",
             f"model {plan.name}: classes {', '.join(plan.class_names)}; positive class "
             f"{plan.positive_class or 'none (multi-class: argmax)'}",
             f"{'split':<6} " + " ".join(f"{name:>{width}}" for name in plan.class_names) + "  total"]
    for split, counts in split_counts(plan).items():
        lines.append(f"{split:<6} " + " ".join(f"{count:>{width}}" for count in counts) + f"  {sum(counts)}")
    checked = "decoded and gated" if plan.gate_checked else "decoded (no gate file: not gated)"
    lines += [plan.split_rule + ".", f"every film {checked} in {plan.check_seconds:.1f} s"]
    lines += [f"left out: {len(plan.left_out)} files"]
    lines += [f"  {item.path.relative_to(plan.data)}: {item.reason}" for item in plan.left_out[:5 * SHOWN]]
    lines += [f"  ... and {len(plan.left_out) - 5 * SHOWN} more"] if len(plan.left_out) > 5 * SHOWN else []
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--data", required=True, type=Path, help="the folder of labelled X-rays")
    parser.add_argument("--name", required=True, help="the model's name (file and URL name)")
    parser.add_argument("--positive", default=None, help="the class the threshold is for (required for 2 classes)")
    parser.add_argument("--seed", default=0, type=int, help="seed of the split made here (folders without splits)")
    parser.add_argument("--min-per-class", default=20, type=int, help="fewest films a class may have")
    parser.add_argument("--gate", default=SHIPPED_GATE, type=Path, help="the gate checkpoint (absent: not gated)")
    return parser


def main(args: argparse.Namespace) -> DataPlan:
    try:
        plan = plan_data(args.data, name=args.name, positive=args.positive, seed=args.seed,
                         min_per_class=args.min_per_class, gate_path=args.gate)
    except DataError as error:
        raise SystemExit(str(error)) from None
    print(describe(plan))
    return plan


if __name__ == "__main__":
    main(get_args_parser().parse_args())
