"""Grad-CAM overlays of image files, and how much of the heat falls on the lung fields (analysis beside the
server; the Grad-CAM itself is cxr_core.explain, shipped in every archive).

    python -m cxr.explain --checkpoint models/pneumonia/model.pt --out-dir runs/explanations IMAGE...
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import numpy as np
import torch

from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint, preprocess_config
from cxr_core.decision import calibrated_probabilities
from cxr_core.explain import grad_cam, model_view, overlay_png
from cxr_core.preprocessing import EvalPreset


def lung_prior(size: int) -> np.ndarray:
    """A crude lung-field mask: two upright ellipses where the lungs sit on a frontal film squashed to a square.

    No segmentation model exists here; this prior only asks whether Grad-CAM's heat falls more inside the
    lung fields than a uniform map would (its area fraction, 0.36).
    """
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    return np.logical_or.reduce([((x - cx) / 0.18) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1 for cx in (0.31, 0.69)])


def lung_heat_fraction(heatmap: np.ndarray) -> float:
    """Share of the heatmap's mass inside `lung_prior` (a uniform heatmap scores the prior's area, 0.36)."""
    mask = lung_prior(heatmap.shape[-1])
    if heatmap.shape[-2] != heatmap.shape[-1]:
        raise ValueError("square heatmaps only")
    return float(heatmap[mask].sum() / max(float(heatmap.sum()), 1e-12))


def main() -> None:
    """Write Grad-CAM overlays of image files: python -m cxr.explain --checkpoint CKPT --out-dir DIR IMAGE..."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--checkpoint", default="models/pneumonia/model.pt")
    parser.add_argument("--out-dir", default="runs/explanations", type=Path)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    model, preset = model_from_checkpoint(checkpoint), EvalPreset(preprocess_config(checkpoint))
    config, serving = preset.config, ServingConfig.from_checkpoint(checkpoint)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        tensor = preset.load(path)
        with torch.no_grad():
            logits = model(tensor[None]).numpy()
        probabilities = calibrated_probabilities(logits, serving.temperature)[0]
        target = int(serving.decide(probabilities[None])[0])
        heatmap = grad_cam(model, checkpoint["arch"], tensor[None], [target], [serving.margin_needed(target)])[0]
        gray = model_view(tensor, config.mean[0], config.std[0])
        name = f"{path.parent.name}_{path.stem}_as_{checkpoint['class_names'][target]}.png"
        (args.out_dir / name).write_bytes(base64.b64decode(overlay_png(gray, heatmap)))
        print(f"{path} -> {args.out_dir / name} (p={float(probabilities[target]):.3f}, "
              f"heat inside lung fields {lung_heat_fraction(heatmap):.2f}, uniform {lung_prior(64).mean():.2f})")


if __name__ == "__main__":
    main()
