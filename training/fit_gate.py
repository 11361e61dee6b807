"""Train the out-of-distribution gate (`cxr_core.gate`) and report what it accepts and refuses.

    python -m training.fit_gate --data "$CXR_DATA/pneumonia" --data "$CXR_DATA/multiclass"

Positives: the train X-rays of every --data root. Negatives: the "dev" half of `training.not_xrays` plus more
synthetic noise/blank/drawing/document images. The limit is chosen on the val X-rays; the report scores every
split and class folder of every root and the "held_out" half of the negatives (never used for fitting).
Writes `runs/gate/ood_gate.pt` (copy it to `models/gate/` to ship it) and its report (`--report`;
`make gate REPORTS=docs` refreshes `docs/gate.md`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cxr.commands import command_parser
from cxr.data import image_files
from cxr.report import table
from cxr_core.gate import GateNet, OodGate, gate_input
from cxr_core.preprocessing import EvalPreset, PreprocessConfig, load_image
from training.not_xrays import CATEGORIES, not_xrays, split_of

# The gate sees the model input; every shipped model uses 128 px with these statistics.
FIT_PREPROCESSING = PreprocessConfig(image_size=128)
SYNTHETIC = ("noise", "blank", "drawing", "document")


def thumbnails(images: list[Any], description: str) -> torch.Tensor:
    """(N, 1, 64, 64) uint8 gate inputs of images (paths or PIL images), through the serving preprocessing."""
    preset, config = EvalPreset(FIT_PREPROCESSING), FIT_PREPROCESSING
    out = []
    for start in tqdm(range(0, len(images), 256), desc=description, leave=False):
        batch = torch.stack([preset(load_image(image)) for image in images[start:start + 256]])
        out.append((gate_input(batch, config.mean[0], config.std[0]) * 255).round().to(torch.uint8))
    return torch.cat(out) if out else torch.zeros((0, 1, 64, 64), dtype=torch.uint8)


def xray_files(root: Path, split: str) -> dict[str, list[Path]]:
    """Class folder -> image files of one split."""
    return {folder.name: image_files(folder)
            for folder in sorted((root / split).iterdir()) if folder.is_dir()} if (root / split).is_dir() else {}


def augment(batch: torch.Tensor, negative: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness/contrast jitter and a small random zoom for all; flips and quarter turns for negatives only
    (a quarter-turned X-ray is a negative, so positives keep their orientation)."""
    n = len(batch)
    contrast = 0.75 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    brightness = 0.15 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    batch = ((batch - 0.5) * contrast + 0.5 + brightness).clamp(0, 1)
    scale = 1.0 + 0.15 * torch.rand(1, generator=generator).item()
    if scale > 1.02:
        size = int(64 * scale)
        zoomed = nn.functional.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        offset = (size - 64) // 2
        batch = zoomed[:, :, offset:offset + 64, offset:offset + 64]
    turns = torch.randint(0, 4, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    for index in torch.nonzero(negative).flatten().tolist():
        image = torch.rot90(batch[index], int(turns[index]), dims=(1, 2))
        batch[index] = torch.flip(image, dims=(2,)) if flips[index] else image
    return batch.contiguous()


def train_gate(positives: torch.Tensor, negatives: torch.Tensor, epochs: int, seed: int) -> GateNet:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = GateNet()
    images = torch.cat([positives, negatives])
    labels = torch.cat([torch.zeros(len(positives)), torch.ones(len(negatives))])
    # Half of each batch negative, however few negatives there are.
    weights = torch.cat([torch.full((len(positives),), 0.5 / len(positives)),
                         torch.full((len(negatives),), 0.5 / len(negatives))])
    steps, batch_size = max(len(positives) // 64, 50), 64
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        net.train()
        indices = torch.multinomial(weights, steps * batch_size, replacement=True, generator=generator)
        progress = tqdm(indices.view(steps, batch_size), desc=f"gate epoch {epoch + 1}/{epochs}", leave=False)
        for batch_indices in progress:
            target = labels[batch_indices]
            batch = augment(images[batch_indices].float() / 255, target.bool(), generator)
            loss = loss_fn(net(batch), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def score(net: GateNet, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([torch.sigmoid(net(images[i:i + 512].float() / 255))
                          for i in range(0, len(images), 512)]).numpy() if len(images) else np.zeros(0)


def measure_latency(gate: OodGate, batch_size: int = 8, repeats: int = 50) -> dict[str, float]:
    """Median ms of the gate and of the shipped classifier on the same 128 px batch, same threads."""
    from cxr_core.checkpoint import load_checkpoint, model_from_checkpoint

    batch = torch.randn(batch_size, 1, 128, 128)
    model = model_from_checkpoint(load_checkpoint("models/pneumonia/model.pt"))
    timings: dict[str, list[float]] = {"gate_ms": [], "classifier_ms": []}
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            gate.scores(batch, 0.484, 0.234)
            middle = time.perf_counter()
            model(batch)
            timings["gate_ms"].append((middle - started) * 1000)
            timings["classifier_ms"].append((time.perf_counter() - middle) * 1000)
    return {"batch_size": batch_size, **{key: float(np.median(values)) for key, values in timings.items()}}


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    roots = [Path(root) for root in args.data]
    positives = torch.cat([thumbnails([p for files in xray_files(root, "train").values() for p in files],
                                      f"{root.name}/train") for root in roots])
    items = not_xrays(roots, seed=0)
    extra = [item for seed in range(1, args.extra_synthetic + 1)
             for item in not_xrays([], crops_per_photo=0, seed=seed) if item.category in SYNTHETIC]
    fit_items = [item for item in items if split_of(item.source) == "dev"] + extra
    held_out = [item for item in items if split_of(item.source) == "held_out"]
    negatives = thumbnails([item.image for item in fit_items], "negatives")
    print(f"fitting on {len(positives)} X-rays and {len(negatives)} other images "
          f"({len(held_out)} held out)")
    net = train_gate(positives, negatives, args.epochs, args.seed)

    val_scores = np.concatenate([score(net, thumbnails([p for files in xray_files(root, "val").values()
                                                        for p in files], f"{root.name}/val")) for root in roots])
    limit = float(max(0.5, np.quantile(val_scores, args.accept_quantile)))
    print("highest val X-ray scores:", np.round(np.sort(val_scores)[-6:], 4))
    acceptance = {}
    for root in roots:
        for split in ("train", "val", "test"):
            for folder, files in xray_files(root, split).items():
                values = score(net, thumbnails(files, f"{root.name}/{split}/{folder}"))
                acceptance[f"{root.name}/{split}/{folder}"] = {"n": len(values),
                                                                "accepted": float(np.mean(values <= limit))}
    samples = sorted((roots[0].parent / "samples").glob("*/*"))
    if samples:
        values = score(net, thumbnails(samples, "samples"))
        acceptance["samples"] = {"n": len(values), "accepted": float(np.mean(values <= limit))}
    held_scores = score(net, thumbnails([item.image for item in held_out], "held out"))
    refusal = {}
    for category in CATEGORIES:
        chosen = np.array([item.category == category for item in held_out])
        if chosen.any():
            refusal[category] = {"n": int(chosen.sum()), "refused": float(np.mean(held_scores[chosen] > limit))}
    refused_all = float(np.mean(held_scores > limit))
    print("lowest held-out scores:", np.round(np.sort(held_scores)[:12], 4))
    accepted_examples = sorted(f"{item.name} ({value:.2f})" for item, value in zip(held_out, held_scores,
                                                                                      strict=True) if value <= limit)
    checkpoint = {"width": 16, "state_dict": net.state_dict(), "limit": limit, "input": "64x64 of the model input",
                  "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "metrics": {"acceptance": acceptance, "held_out_refusal": refusal,
                              "held_out_refused": refused_all, "fit": {"xrays": len(positives),
                                                                       "others": len(negatives)}}}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    latency = measure_latency(OodGate.load(output))
    checkpoint["metrics"]["latency"] = latency
    torch.save(checkpoint, output)
    if args.report:
        write_report(Path(args.report), checkpoint["metrics"], limit, accepted_examples)
    summary = {"limit": limit, "held_out_refused": refused_all,
               "lowest_acceptance": min(acceptance.items(), key=lambda kv: kv[1]["accepted"]), "latency": latency}
    print(json.dumps(summary, indent=2))
    return summary


def write_report(path: Path, metrics: dict[str, Any], limit: float, accepted_examples: list[str]) -> None:
    lines = ["# Out-of-distribution gate", "",
             "Written by `python -m training.fit_gate` (`make gate`). The gate answers 422 "
             "`not a chest X-ray` when its score (probability of not being a chest X-ray) is above "
             f"**{limit:.3f}** (chosen on the val X-rays).", "",
             "## Chest X-rays accepted (goal >= 99.5% in every split and source)", "",
             *table(["split / class folder (source)", "n", "accepted"])]
    lines += [f"| {name} | {v['n']} | {v['accepted']:.2%} |" for name, v in metrics["acceptance"].items()]
    lines += ["", "## Held-out images that are not chest X-rays refused (goal >= 95%)", "",
              "Never used for fitting: the other half of `training.not_xrays` (whole source images held out).", "",
              *table(["category", "n", "refused"])]
    lines += [f"| {name} | {v['n']} | {v['refused']:.1%} |" for name, v in metrics["held_out_refusal"].items()]
    lines += [f"| **all** | {sum(v['n'] for v in metrics['held_out_refusal'].values())} | "
              f"**{metrics['held_out_refused']:.1%}** |", ""]
    if accepted_examples:
        lines += ["Held-out images it lets through: " + ", ".join(accepted_examples[:30]) + ".", ""]
    latency = metrics.get("latency")
    if latency:
        lines += ["## Cost", "",
                  f"Median over 50 runs, batch of {latency['batch_size']} at 128 px, same process and threads: gate "
                  f"{latency['gate_ms']:.2f} ms, ResNet-18 classifier {latency['classifier_ms']:.2f} ms "
                  f"(gate = {latency['gate_ms'] / latency['classifier_ms']:.1%} of the classifier).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--data", action="append", required=True, help="an ImageFolder root (repeatable)")
    parser.add_argument("--output", default="runs/gate/ood_gate.pt", help="copy to models/gate/ to ship it")
    parser.add_argument("--report", default="runs/gate/gate.md")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--extra-synthetic", type=int, default=3, help="extra seeds of synthetic negatives")
    parser.add_argument("--accept-quantile", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
