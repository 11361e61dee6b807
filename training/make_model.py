"""`make model`: from a folder of labelled X-rays to a served, calibrated, population-checked model.

    python -m training.make_model --name adult --data ../shared/data/rsna --positive OPACITY

Steps, in order, each timed, each resumed from where the last run stopped (runs/models/<name>/state.json):
check (training.own_data: layout, classes, splits, every film decoded and gated) -> train (fine-tuned from the
shipped model, training.fine_tune) -> calibrate (temperature and threshold on val) -> gate (the gate accepts the
val films) -> population (a population check fitted for this model, training.own_population) -> export (every
variant, each checked against eager) -> archive (model_store/<name>.mar and its variants) -> report (test
metrics of the exported model, pointing game where there are boxes) -> card (the model card). Nothing the user
has is written: their folder is read, an archive already in the model store stops the run (use --version), and
a run folder made with other settings stops it too (use another name or remove the folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxr.commands import command_parser
from cxr.paths import REPO, data_root
from export.archive import FIRST_VERSION
from training.fine_tune import Recipe, recipe_preprocessing
from training.own_data import SERVED_MODELS, DataError

STATE = "state.json"
THRESHOLD_RULES = ("recall", "youden")


@dataclass(frozen=True)
class Request:
    """Everything a run is made from; a resumed run must ask for the same."""

    name: str
    data: str
    positive: str | None = None
    version: str = FIRST_VERSION
    rule: str = "recall"  # how the threshold is chosen on val (THRESHOLD_RULES)
    min_sensitivity: float = 0.95  # the recall-first rule's target on val
    others: tuple[str, ...] = ()  # extra folders of other-population films for the population check
    extra: tuple[str, ...] = ()  # CLASS=FOLDER: more training films of a class (kept off val/test look-alikes)
    recipe: Recipe = field(default_factory=Recipe)
    data_root: str | None = None  # the shared data sets: every other source there is a population negative
    intended: str | None = None  # whom the model is for, in one line (answers and card); default: from the data
    model_card: str | None = None  # where refusals say the card is; default: the run folder's model_card.md
    seed: int = 0

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def key(self) -> str:
        """The settings' fingerprint; a recipe without `detail` keeps the fingerprint it had before that option."""
        settings = asdict(self)
        if settings["recipe"]["detail"] is None:
            del settings["recipe"]["detail"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Run:
    """A run's folder and what its finished steps recorded."""

    request: Request
    folder: Path
    model_store: Path
    served: tuple[str, ...] = SERVED_MODELS
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def tree(self) -> Path:
        """The user's films as an ImageFolder tree of links (DICOM decoded to PNG): what every step reads."""
        return self.folder / "data"

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    def load(self) -> None:
        file = self.folder / STATE
        if not file.is_file():
            self.state = {"request": self.request.as_json(), "key": self.request.key(), "steps": {}}
            return
        self.state = json.loads(file.read_text())
        if self.state.get("key") != self.request.key():
            raise DataError(f"{self.folder} holds a run of {self.request.name} made with other settings "
                            f"({_difference(self.state.get('request', {}), self.request.as_json())}): use another "
                            f"NAME, or remove that folder to start over")

    def finish(self, step: str, seconds: float, facts: dict[str, Any]) -> None:
        self.state["steps"][step] = {"seconds": round(seconds, 1), **facts}
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / (STATE + ".tmp")
        temporary.write_text(json.dumps(self.state, indent=2, default=str) + "\n")
        temporary.replace(self.folder / STATE)

    def facts(self, step: str) -> dict[str, Any]:
        return self.state["steps"][step]


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in new if old.get(key) != new.get(key)]
    return "; ".join(changed) or "another version of this tool"


def steps() -> list[tuple[str, Callable[[Run], dict[str, Any]]]]:
    """The steps in order (imported here so that `--help` and a bad NAME answer at once)."""
    from training import model_steps
    return [("check", model_steps.check), ("train", model_steps.train), ("calibrate", model_steps.calibrate),
            ("gate", model_steps.gate), ("population", model_steps.population), ("export", model_steps.export),
            ("archive", model_steps.archive), ("report", model_steps.report), ("card", model_steps.card)]


def check_detail(recipe: Recipe) -> None:
    """DETAIL must suit the input of every model training may start from (SIZE, or that model's own size): checked
    by the preprocessing itself, before any step runs."""
    if recipe.detail is None:
        return
    from cxr_core.checkpoint import load_checkpoint, preprocess_config
    from cxr_core.preprocessing import EvalPreset
    from training.model_steps import SHIPPED

    for path in (path for path in SHIPPED if path.is_file()):
        config = recipe_preprocessing(preprocess_config(load_checkpoint(path)), recipe)
        try:
            EvalPreset(config)
        except ValueError:
            raise DataError(f"DETAIL={recipe.detail} must be a side in pixels below the input size "
                            f"({config.image_size}): choose a smaller DETAIL or a larger SIZE") from None


def make_model(request: Request, *, runs: Path = REPO / "runs" / "models", model_store: Path = REPO / "model_store",
               served: tuple[str, ...] = SERVED_MODELS, stop_after: str | None = None) -> Run:
    """Run (or resume) every step for `request`; DataError with one line on the user's input."""
    check_detail(request.recipe)
    run = Run(request, runs / request.name, model_store, served)
    run.load()
    plan = steps()
    total = time.perf_counter()
    for number, (name, step) in enumerate(plan, 1):
        if name in run.state["steps"]:
            print(f"[{number}/{len(plan)}] {name}: done before ({run.facts(name)['seconds']:.0f} s), skipped")
        else:
            print(f"[{number}/{len(plan)}] {name} ...", flush=True)
            started = time.perf_counter()
            facts = step(run)
            run.finish(name, time.perf_counter() - started, facts)
            print(f"[{number}/{len(plan)}] {name}: {time.perf_counter() - started:.1f} s", flush=True)
        if name == stop_after:
            break
    print(f"all steps: {time.perf_counter() - total:.0f} s in this run; "
          f"{sum(s['seconds'] for s in run.state['steps'].values()):.0f} s in all (run folder {run.folder})")
    return run


def serve_command(run: Run) -> str:
    """The one command that serves the new model beside the shipped ones."""
    archive = run.facts("archive")["archive"]
    if Path(archive).parent.resolve() == (REPO / "model_store").resolve() and run.request.version == FIRST_VERSION:
        return f'make serve MODELS="{" ".join((*run.served, run.request.name))}"'
    return f".venv/bin/cxr deploy {archive}   (into the running server of make serve)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--name", required=True, help="the model's name (archive file and URL)")
    parser.add_argument("--data", required=True, help="the folder of labelled X-rays")
    parser.add_argument("--positive", default=None, help="the class the threshold is for (required for 2 classes)")
    parser.add_argument("--version", default=FIRST_VERSION, help="archive version (other than 1.0: -<version> in "
                                                                 "the file names)")
    parser.add_argument("--rule", default="recall", choices=THRESHOLD_RULES,
                        help="threshold on val: recall (highest threshold keeping --min-sensitivity) or youden")
    parser.add_argument("--min-sensitivity", default=0.95, type=float)
    parser.add_argument("--other", action="append", default=[], help="a folder of films of other populations "
                        "(negatives of the population check); repeatable")
    parser.add_argument("--extra", action="append", default=[], help="CLASS=FOLDER: more training films of CLASS; "
                        "repeatable")
    parser.add_argument("--epochs", default=Recipe.epochs, type=int)
    parser.add_argument("--image-size", default=None, type=int,
                        help="the input side in pixels (default: the starting model's, 128)")
    parser.add_argument("--detail", default=None, type=int,
                        help="squash films to this side first, then to the input side (less source texture)")
    parser.add_argument("--box-weight", default=Recipe.box_weight, type=float,
                        help="weight of the localisation loss where the data has boxes (0: off)")
    parser.add_argument("--data-root", default=None, help="the shared data sets (default: $CXR_DATA or "
                        "../shared/data): their other sources are the population check's negatives")
    parser.add_argument("--intended-population", default=None,
                        help="whom the model is for, one line (e.g. 'Adult frontal chest X-rays, PA and AP')")
    parser.add_argument("--model-card", default=None, help="where refusals say the model card is (default: "
                        "the run folder's model_card.md; a shipped model: docs/model_cards/<name>.md)")
    parser.add_argument("--runs", default=str(REPO / "runs" / "models"), help="where run folders go")
    parser.add_argument("--model-store", default=str(REPO / "model_store"))
    parser.add_argument("--shipped", action="store_true",
                        help="remake a shipped model under its own name (make train-adult); archives in the model "
                             "store still stop the run")
    parser.add_argument("--stop-after", default=None, help="stop after this step (resume later)")
    return parser


def main(args: argparse.Namespace) -> Run:
    root = Path(args.data_root) if args.data_root else data_root()
    request = Request(name=args.name, data=str(Path(args.data).resolve()), positive=args.positive,
                      version=args.version, rule=args.rule, min_sensitivity=args.min_sensitivity,
                      others=tuple(str(Path(o).resolve()) for o in args.other), extra=tuple(args.extra),
                      recipe=Recipe(epochs=args.epochs, box_weight=args.box_weight, image_size=args.image_size,
                                    detail=args.detail),
                      data_root=str(root.resolve()) if root.is_dir() else None,
                      intended=args.intended_population, model_card=args.model_card)
    try:
        served = tuple(name for name in SERVED_MODELS if not (args.shipped and name == args.name))
        run = make_model(request, runs=Path(args.runs), model_store=Path(args.model_store), served=served,
                         stop_after=args.stop_after)
    except DataError as error:
        raise SystemExit(f"make model: {error}") from None
    if "archive" in run.state["steps"]:
        print(f"\nserve it: {serve_command(run)}")
    return run


if __name__ == "__main__":
    main(get_args_parser().parse_args())
