"""The adult normal films of multiclass/train/NORMAL, linked into one folder: extra NO_OPACITY films for the
adult model (`make train-adult` passes them as `EXTRA=NO_OPACITY=<folder>`).

    python -m training.adult_normals --out runs/extra_adult_normals

That class is the COVID-19 Radiography Database's Normal: RSNA's adult films (the adult model's own source) mixed
with Kermany's pediatric normals; the pediatric copies, found by their pixels, are left out. `make model` then
leaves out any film that looks like one of the run's val or test films.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr.commands import command_parser
from cxr.paths import data_root
from training.adults import multiclass_films


def link_adult_normals(multiclass: Path, out: Path) -> int:
    """Symbolic links to the adult films of `multiclass`/train/NORMAL in `out` (made anew); their number."""
    adults = [path for group, path in multiclass_films(multiclass, "train") if group == "NORMAL (adult, CRD)"]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_symlink():
            old.unlink()
    for path in adults:
        (out / path.name).symlink_to(path.resolve())
    return len(adults)


def main(args: argparse.Namespace) -> None:
    count = link_adult_normals(Path(args.multiclass), Path(args.out))
    print(f"{count} adult normal films linked in {args.out}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--multiclass", default=str(data_root() / "multiclass"))
    parser.add_argument("--out", default="runs/extra_adult_normals")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
