"""The population check's report: flagged share per source and split, what the model says of the films it lets
through, the candidates compared, leave-one-source-out figures and a score histogram (Markdown, JSON, PNG)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr.report import figure, table
from cxr_core.population import outside
from training.population_data import Film

SOURCE_NAMES = {
    "own": "the model's own films",
    "kermany": "Kermany pediatric (pneumonia/)",
    "kermany_multiclass": "Kermany pediatric pneumonia (multiclass/PNEUMONIA)",
    "kermany_in_crd": "Kermany normals inside the CRD Normal class",
    "samples": "samples/ (Kermany test originals)",
    "crd_normal": "CRD Normal, adult (Kermany copies set aside)",
    "crd_covid": "CRD COVID-19",
    "tbx11k": "TBX11K tuberculosis",
    "rsna": "RSNA adults (rsna/)",
}
SOURCE_ORDER = tuple(SOURCE_NAMES)


def percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.1f}%"  # NaN: no films


def group_of(film: Film) -> str:
    """The report's source: Kermany films inside multiclass/ (cxr4's PNEUMONIA class) apart from pneumonia/."""
    return "kermany_multiclass" if film.source == "kermany" and film.folder == "multiclass" else film.source


def source_order(films: list[Film]) -> list[str]:
    """The known sources in SOURCE_ORDER, then any other (a user's folders) in the order met."""
    found = list(dict.fromkeys(group_of(film) for film in films))
    return sorted(found, key=lambda s: (SOURCE_ORDER.index(s) if s in SOURCE_ORDER else len(SOURCE_ORDER),
                                        found.index(s)))


def groups(films: list[Film]) -> list[tuple[str, str, str, np.ndarray]]:
    """(source, split, label or "", mask) per source and split, and per label where a source has several."""
    found = []
    for source in source_order(films):
        for split in ("train", "val", "test"):
            mask = np.asarray([group_of(f) == source and f.split == split for f in films])
            if mask.any():
                found.append((source, split, "", mask))
                labels = sorted({f.label for f, m in zip(films, mask, strict=True) if m})
                for label in labels if len(labels) > 1 else []:
                    found.append((source, split, label, mask & np.asarray([f.label == label for f in films])))
    return found


def write_report(name: str, films: list[Film], scores: np.ndarray, limit: float, said: list[str],
                 rows: dict[str, dict[str, Any]], chosen: str, population_of: Callable[[Film], str],
                 report_dir: str | Path, *, stem: str | None = None, command: str = "training.fit_population",
                 notes: Sequence[str] = (), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `<stem>.md`, `<stem>.json` and `population_<name>.png` (stem: the model's name unless given);
    `population_of` says "own", "other" or "same source" of a film (a group of films of several: each, joined);
    `notes`: paragraphs under the candidates (the rule that chose); `extra` goes into the summary."""
    report_dir, stem = Path(report_dir), stem or name
    report_dir.mkdir(parents=True, exist_ok=True)
    flagged = outside(scores, limit)
    table_rows, by_group = [], {}
    for source, split, label, mask in groups(films):
        kept = Counter(s for s, m, o in zip(said, mask, flagged, strict=True) if m and not o)
        population = " / ".join(sorted({population_of(f) for f, m in zip(films, mask, strict=True) if m}))
        key = f"{source}/{split}" + (f"/{label}" if label else "")
        by_group[key] = {"films": int(mask.sum()), "flagged": float(flagged[mask].mean()), "population": population,
                         "not_flagged_said": dict(kept)}
        table_rows.append([SOURCE_NAMES.get(source, source) + (f", {label}" if label else ""), split, population,
                           int(mask.sum()), percent(flagged[mask].mean()),
                           ", ".join(f"{k} {v}" for k, v in sorted(kept.items()))])
    methods = [[name_ + (" **(shipped)**" if name_ == chosen else ""), percent(row["own_val"]),
                *[f"{percent(v['val'])} / {percent(v['test'])}" for v in row.get("held_out", {}).values()],
                *[f"{percent(v['train+val'])} / {percent(v['test'])}" for v in row["loso"].values()]]
               for name_, row in rows.items()]
    loso_sources = list(next(iter(rows.values()))["loso"])
    held_out = list(rows[chosen].get("held_out", {}))  # films never fitted on, judged by the full fit
    summary = {"method": chosen, "limit": limit, "groups": by_group, "loso": rows[chosen]["loso"],
               "own_val_flagged": rows[chosen]["own_val"], **(extra or {})}
    if held_out:
        summary["held_out"] = rows[chosen]["held_out"]
    lines = [f"# Population check of `{name}`", "",
             f"Written by `python -m {command}` ({chosen}; limit {limit:.4f}, the highest of the 99th "
             "percentiles of each class's scores on the model's own validation films). Flagged = score above "
             "the limit (refused with 422 by default).",
             "", "## Per source and split", "",
             *table(["source", "split", "population", "films", "flagged", "the model says of the films not flagged"],
                    table_rows),
             "", "## Candidates (own val flagged; " + ("held out: flagged val / test of films never fitted on; "
                                                       if held_out else "") +
             "leave-one-source-out: flagged train+val / test of the source left out of fitting)", "",
             *table(["candidate", "own val", *(f"{name} (held out)" for name in held_out), *loso_sources], methods),
             *[line for note in notes for line in ("", note)], "",
             f"![scores](population_{name}.png)", ""]
    (report_dir / f"{stem}.md").write_text("\n".join(lines))
    (report_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    with figure(report_dir / f"population_{name}.png", figsize=(7, 3.6)) as axes:
        high = float(np.quantile(scores, 0.995))
        bins = np.linspace(float(scores.min()), max(high, limit * 1.2), 60)
        for source in source_order(films):
            mask = np.asarray([group_of(f) == source and f.split == "test" for f in films])
            if mask.any():
                axes.hist(np.clip(scores[mask], None, bins[-1]), bins=bins, histtype="step", density=True,
                          label=f"{SOURCE_NAMES.get(source, source)} test")
        axes.axvline(limit, color="black", linestyle="--", label="limit")
        axes.set_xlabel("population score (higher: further from the training population)")
        axes.set_ylabel("density")
        axes.legend(fontsize=6)
    return {"summary": summary, "markdown": "\n".join(lines)}
