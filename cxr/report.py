"""Figures and Markdown tables for the reports (training, evaluation, calibration, benchmarks, load tests):
one way to draw off-screen and save a figure, one way to write a table, one way to write a report and its data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figure(path: str | Path, *, figsize: tuple[float, float], dpi: int = 110, **subplots: Any) -> Iterator[Any]:
    """`with figure(path, figsize=(5, 5)) as axes: ...` draws off-screen (no display needed) and saves a tight
    PNG when the block ends; `subplots` go to `plt.subplots` (`ncols=2` gives two axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn, axes = plt.subplots(figsize=figsize, **subplots)
    try:
        yield axes
        drawn.tight_layout()
        drawn.savefig(path, dpi=dpi)
    finally:
        plt.close(drawn)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]] = ()) -> list[str]:
    """A Markdown table's lines: the header, its rule, then one line per row (cells shown with str())."""
    def line(cells: Sequence[Any]) -> str:
        return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def write_markdown_and_json(output: str | Path, text: str, data: Any) -> Path:
    """The Markdown report `text` at `output` and `data` beside it as JSON (same name, `.json`; values JSON cannot
    hold, e.g. numpy numbers, written as floats). Returns the report's path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    return output
