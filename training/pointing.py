"""The pointing game: does a model's Grad-CAM peak fall inside the radiologists' boxes?

    python -m training.pointing --checkpoint models/pneumonia/model.pt --data ../shared/data/rsna \\
        --split test --label OPACITY --target PNEUMONIA --output-dir runs/pointing

For each film, the Grad-CAM heatmap of class `target` (cxr_core.explain, on the input the served model sees:
the whole film squashed to a square) and its hottest pixel; a hit is that pixel's centre inside any of the
film's boxes, mapped from the film's pixels to the input by scaling x by size/width and y by size/height.
The chance baseline is the share of the image the boxes cover (their union), averaged over films: where a
uniformly random point would land inside; `random_point_share` draws one such point per film (seed 0) and
judges it by the same rule. Writes pointing.json and pointing.png (example overlays, boxes drawn).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr.commands import command_parser
from cxr.report import figure
from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint, preprocess_config
from cxr_core.explain import grad_cam, model_view
from cxr_core.preprocessing import EvalPreset
from training.fine_tune import Box, box_on_input, parse_boxes

Film = tuple[Path, tuple[Box, ...]]
BOX_COLUMN = "opacity_boxes_xywh"


def inside_any(point: tuple[float, float], boxes: Sequence[Box]) -> bool:
    """Whether the point (x, y) lies in any box, edges included."""
    px, py = point
    return any(x <= px <= x + w and y <= py <= y + h for x, y, w, h in boxes)


def peak(heatmap: np.ndarray) -> tuple[float, float] | None:
    """The (x, y) centre of the heatmap's hottest pixel; None for a flat map (no peak to point with)."""
    if float(heatmap.max()) <= float(heatmap.min()):
        return None
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return col + 0.5, row + 0.5


def union_share(boxes: Sequence[Box], film_size: tuple[int, int]) -> float:
    """The share of the film covered by the union of its boxes (clipped to the film), exactly."""
    width, height = film_size
    clipped = [(max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)) for x, y, w, h in boxes]
    clipped = [box for box in clipped if box[2] > box[0] and box[3] > box[1]]
    if not clipped:
        return 0.0
    xs = sorted({value for box in clipped for value in (box[0], box[2])})
    ys = sorted({value for box in clipped for value in (box[1], box[3])})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:], strict=False):
        for y0, y1 in zip(ys, ys[1:], strict=False):
            if any(b[0] <= x0 and x1 <= b[2] and b[1] <= y0 and y1 <= b[3] for b in clipped):
                area += (x1 - x0) * (y1 - y0)
    return area / (width * height)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion (95% by default)."""
    if trials == 0:
        return [float("nan"), float("nan")]
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def chance_p_value(hits: int, chances: Sequence[float]) -> float:
    """P(at least `hits` hits) when film i is hit by chance alone with probability chances[i] (exact,
    Poisson-binomial): how surprising the hits are for a model that points at random."""
    distribution = np.zeros(len(chances) + 1)
    distribution[0] = 1.0
    for p in chances:
        distribution[1:] = distribution[1:] * (1 - p) + distribution[:-1] * p
        distribution[0] *= 1 - p
    return float(min(1.0, distribution[hits:].sum()))


def explain_films(checkpoint: dict[str, Any], paths: Sequence[Path], *, target: int, batch_size: int = 16
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(the grayscale input the model saw, the Grad-CAM heatmap of `target`: its evidence above the margin it
    needs to be the answer) for each film, in order."""
    model = model_from_checkpoint(checkpoint)
    config = preprocess_config(checkpoint)
    preset, needed = EvalPreset(config), ServingConfig.from_checkpoint(checkpoint).margin_needed(target)
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([preset.load(path) for path in paths[start:start + batch_size]])
        heatmaps = grad_cam(model, checkpoint["arch"], batch, [target] * len(batch), [needed] * len(batch))
        for tensor, heatmap in zip(batch, heatmaps, strict=True):
            yield model_view(tensor, config.mean[0], config.std[0]), heatmap


def pointing_game(checkpoint: dict[str, Any], films: Sequence[Film], *, target: int,
                  batch_size: int = 16) -> dict[str, Any]:
    """Hits of the Grad-CAM peak of class `target` in each film's boxes, against the chance of a random point."""
    size = preprocess_config(checkpoint).image_size
    rng = np.random.default_rng(0)
    records = []
    heatmaps = explain_films(checkpoint, [path for path, _ in films], target=target, batch_size=batch_size)
    for (path, boxes), (_, heatmap) in zip(films, heatmaps, strict=True):
        with Image.open(path) as image:
            film_size = image.size
        on_input = [box_on_input(box, film_size, size) for box in boxes]
        point = peak(heatmap)
        random_point = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
        records.append({"film": str(path), "boxes": len(boxes), "peak_xy": point,
                        "hit": point is not None and inside_any(point, on_input),
                        "box_share": union_share(boxes, film_size),
                        "random_hit": inside_any(random_point, on_input)})
    count = len(records)
    hits = sum(record["hit"] for record in records)
    chances = [record["box_share"] for record in records]
    return {"films": count, "hits": hits, "share": hits / count if count else float("nan"),
            "baseline_share": float(np.mean(chances)) if count else float("nan"),
            "random_point_share": float(np.mean([r["random_hit"] for r in records])) if count else float("nan"),
            "ci95": wilson_interval(hits, count), "p_chance": chance_p_value(hits, chances),
            "flat_heatmaps": sum(record["peak_xy"] is None for record in records), "per_film": records}


def plot_examples(path: str | Path, checkpoint: dict[str, Any], films: Sequence[Film], *, target: int,
                  columns: int = 4) -> None:
    """A figure of the films' Grad-CAM overlays with their boxes (green) and the heatmap's peak (cyan cross)."""
    if not films:
        return
    size = preprocess_config(checkpoint).image_size
    rows = math.ceil(len(films) / columns)
    explained = explain_films(checkpoint, [film for film, _ in films], target=target)
    with figure(path, figsize=(2.6 * columns, 2.8 * rows), nrows=rows, ncols=columns, squeeze=False) as axes:
        from matplotlib.patches import Rectangle

        for axis in axes.ravel():
            axis.axis("off")
        for axis, (film, boxes), (gray, heatmap) in zip(axes.ravel(), films, explained, strict=False):
            with Image.open(film) as image:
                film_size = image.size
            axis.imshow(gray, cmap="gray", vmin=0, vmax=255)
            axis.imshow(heatmap, cmap="inferno", alpha=0.45, vmin=0, vmax=1)
            on_input = [box_on_input(box, film_size, size) for box in boxes]
            for x, y, w, h in on_input:
                axis.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="lime", linewidth=1.2))
            point = peak(heatmap)
            if point is not None:  # imshow puts pixel k's centre at k: shift by half a pixel
                axis.plot(point[0] - 0.5, point[1] - 0.5, marker="x", color="cyan", markersize=9, mew=2)
            hit = point is not None and inside_any(point, on_input)
            axis.set_title(f"{'hit' if hit else 'miss'}: {Path(film).stem[:13]}", fontsize=7)


def manifest_films(data: Path, split: str, label: str) -> list[Film]:
    """The films of one split and label in `data`/manifest.csv with their boxes (films without boxes left out)."""
    with open(data / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == split and row["label"] == label]
    films = [(data / row["file"], parse_boxes(row.get(BOX_COLUMN) or "")) for row in rows]
    return [film for film in films if film[1]]


def example_films(films: Sequence[Film], per_film: Sequence[dict[str, Any]], count: int) -> list[Film]:
    """Up to `count` films, hits and misses alike (half each where there are enough), in manifest order."""
    hits = [film for film, record in zip(films, per_film, strict=True) if record["hit"]]
    misses = [film for film, record in zip(films, per_film, strict=True) if not record["hit"]]
    take_hits = min(len(hits), max(count // 2, count - len(misses)))
    return hits[:take_hits] + misses[:count - take_hits]


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    names = list(checkpoint["class_names"])
    target_name = args.target or checkpoint.get("positive_class")
    if target_name not in names:
        raise SystemExit(f"--target {target_name!r} is not one of the model's classes {names}")
    target = names.index(target_name)
    films = manifest_films(Path(args.data), args.split, args.label)
    if not films:
        raise SystemExit(f"{args.data}/manifest.csv has no {args.split} {args.label} films with boxes")
    result = pointing_game(checkpoint, films, target=target, batch_size=args.batch_size)
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
              "label": args.label, "target": target_name, **result}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "pointing.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_examples(output / "pointing.png", checkpoint, example_films(films, result["per_film"], args.examples),
                  target=target)
    print(json.dumps({key: value for key, value in result.items() if key != "per_film"}, indent=2))
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="a data folder with manifest.csv and its boxes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--label", default="OPACITY", help="the manifest label whose films have boxes")
    parser.add_argument("--target", help="the class whose heatmap points (default: the positive class)")
    parser.add_argument("--output-dir", default="runs/pointing")
    parser.add_argument("--examples", type=int, default=8, help="films drawn in pointing.png")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
