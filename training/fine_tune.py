"""Fine-tune a shipped model on a user's films (`make model`'s train step).

Starts from the weights of a shipped model (no downloads): the one whose frozen features tell the user's classes
apart best (`choose_start`), with its architecture and preprocessing, the last layer mapped class for class where
a 2-class model meets a 2-class data set (negative to negative, positive to positive), fresh otherwise.
Where the data set has boxes around findings (a manifest column, `x y w h` per box, `;` between boxes, in the
film's pixels), the class activation map of the positive class is also taught to lie inside them (`box_weight`):
a localisation signal from the radiologists, used in training only; the served model is the same plain
classifier.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cxr.metrics import roc_auc
from cxr_core.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_config
from cxr_core.models import build_model
from cxr_core.preprocessing import EvalPreset, PreprocessConfig, TrainPreset
from training.train import learning_rate, update

Box = tuple[float, float, float, float]  # x, y, w, h in the film's pixels


class Sample(NamedTuple):
    path: Path
    label: int
    boxes: tuple[Box, ...] | None  # None: not known for this film (no localisation loss)


@dataclass(frozen=True)
class Recipe:
    """How a model of the user's films is trained; stored in its checkpoint."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    box_weight: float = 1.0
    image_size: int | None = None  # the model's input side in pixels; None: the starting model's
    detail: int | None = None  # films squashed to this side first (PreprocessConfig.detail); None: not
    seed: int = 0


def recipe_preprocessing(config: PreprocessConfig, recipe: Recipe) -> PreprocessConfig:
    """The starting model's preprocessing with the recipe's input size and detail where it sets them."""
    return replace(config, image_size=recipe.image_size or config.image_size,
                   detail=config.detail if recipe.detail is None else recipe.detail)


def parse_boxes(text: str) -> tuple[Box, ...]:
    """`x y w h;x y w h` -> boxes; an empty text is no box."""
    boxes = []
    for part in filter(None, (chunk.strip() for chunk in text.split(";"))):
        values = tuple(float(value) for value in part.split())
        if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"box {part!r} is not 'x y w h' with a positive width and height")
        boxes.append(values)
    return tuple(boxes)


def box_on_input(box: Box, film_size: tuple[int, int], input_size: int) -> Box:
    """A box in the film's pixels as (x, y, w, h) on the square model input the film is squashed to."""
    width, height = film_size
    sx, sy = input_size / width, input_size / height
    x, y, w, h = box
    return x * sx, y * sy, w * sx, h * sy


def box_mask(boxes: Sequence[Box], film_size: tuple[int, int], side: int) -> torch.Tensor:
    """A (1, side, side) 0/1 mask of the boxes on the squashed square input."""
    mask = torch.zeros(1, side, side)
    for x, y, w, h in (box_on_input(box, film_size, side) for box in boxes):
        left, right, top, bottom = int(x), math.ceil(x + w), int(y), math.ceil(y + h)
        mask[0, max(top, 0):min(bottom, side), max(left, 0):min(right, side)] = 1.0
    return mask


class FilmDataset(Dataset):
    """(image, label, mask, has_mask) for training; the mask follows the image through the augmentation."""

    def __init__(self, samples: Sequence[Sample], preset: TrainPreset | EvalPreset) -> None:
        self.samples, self.preset = list(samples), preset
        self.side = (preset.eval_preset if isinstance(preset, TrainPreset) else preset).config.image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, bool]:
        sample = self.samples[index]
        if isinstance(self.preset, EvalPreset):
            return self.preset.load(sample.path), sample.label, torch.zeros(1, self.side, self.side), False
        image = self.preset.eval_preset.decode(sample.path)
        if sample.boxes is None:
            return self.preset(image), sample.label, torch.zeros(1, self.side, self.side), False
        with Image.open(sample.path) as original:
            size = original.size
        tensor, mask = self.preset.with_mask(image, box_mask(sample.boxes, size, self.side))
        return tensor, sample.label, mask, True


def starting_model(init: Path, class_names: Sequence[str], positive: str | None) -> tuple[nn.Module, PreprocessConfig]:
    """The shipped model's network with its last layer fitted to `class_names` (see the module docstring)."""
    checkpoint = load_checkpoint(init)
    source = model_from_checkpoint(checkpoint)
    model = build_model(checkpoint["arch"], len(class_names), preprocess_config(checkpoint).channels)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    old_positive = checkpoint.get("positive_class")
    if len(class_names) == checkpoint["num_classes"] == 2 and positive and old_positive:
        old = [1 - checkpoint["class_names"].index(old_positive), checkpoint["class_names"].index(old_positive)]
        new = [1 - list(class_names).index(positive), list(class_names).index(positive)]
        order = [old[new.index(row)] for row in range(2)]  # new row -> the old row of the same role
        state |= {"fc.weight": source.fc.weight[order], "fc.bias": source.fc.bias[order]}
    model.load_state_dict(state, strict=False)
    return model.train(), preprocess_config(checkpoint)


@torch.no_grad()
def forward_films(model: nn.Module, samples: Sequence[Sample], config: PreprocessConfig, workers: int = 1,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of `samples`, in order, and the last stage's pooled features (what the last layer
    reads)."""
    loader = DataLoader(FilmDataset(samples, EvalPreset(config)), batch_size=batch_size, num_workers=workers)
    model.eval()
    probabilities, pooled = [], []
    for images, *_ in loader:
        logits, features = activation_map(model, images)
        probabilities.append(torch.softmax(logits, dim=1))
        pooled.append(torch.flatten(model.avgpool(features), 1))
    return torch.cat(probabilities).numpy(), torch.cat(pooled).numpy()


def choose_start(candidates: Sequence[Path], train: Sequence[Sample], val: Sequence[Sample],
                 positive: int | None) -> tuple[Path, dict[str, float]]:
    """The shipped model whose frozen features tell the user's classes apart best: a logistic layer fitted on
    the train films' features, its val AUC compared (every candidate has the same architecture and input)."""
    from sklearn.linear_model import LogisticRegression

    train_labels, val_labels = np.array([s.label for s in train]), np.array([s.label for s in val])
    scores = {}
    for path in candidates:
        checkpoint = load_checkpoint(path)
        model, config = model_from_checkpoint(checkpoint), preprocess_config(checkpoint)
        fitted = LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000).fit(
            forward_films(model, train, config)[1], train_labels)
        scores[str(path)] = auc(val_labels, fitted.predict_proba(forward_films(model, val, config)[1]), positive)
        print(f"start candidate {path}: val AUC of a logistic layer on its frozen features {scores[str(path)]:.4f}")
    return Path(max(scores, key=scores.get)), scores


def activation_map(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision ResNet's logits and its last stage's feature map."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    features = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return model.fc(torch.flatten(model.avgpool(features), 1)), features


def localisation_loss(model: nn.Module, features: torch.Tensor, masks: torch.Tensor, known: torch.Tensor,
                      positive: int) -> torch.Tensor:
    """Binary cross-entropy between the positive-vs-rest class activation map (whose mean is the logit margin)
    and the share of each map cell that the boxes cover."""
    if not known.any():
        return features.new_zeros(())
    weight = model.fc.weight[positive] - model.fc.weight.mean(dim=0)
    bias = model.fc.bias[positive] - model.fc.bias.mean()
    cam = torch.einsum("c,bchw->bhw", weight, features[known]) + bias
    target = F.adaptive_avg_pool2d(masks[known], cam.shape[-2:])[:, 0]
    return F.binary_cross_entropy_with_logits(cam, target)


def fine_tune(model: nn.Module, config: PreprocessConfig, train: Sequence[Sample], val: Sequence[Sample],
              recipe: Recipe, positive: int | None, *, workers: int = 1,
              on_epoch: Callable[[dict[str, Any], nn.Module], None] | None = None,
              state_file: Path | None = None) -> list[dict[str, Any]]:
    """Train in place; after each epoch the val AUC (positive class, or macro one-vs-rest) goes to `on_epoch`
    with the model, then everything needed to go on (weights, optimiser, random states, history) to
    `state_file`: an interrupted run started again resumes after its last finished epoch, as if never stopped.
    Returns the history."""
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    counts = np.bincount([s.label for s in train], minlength=model.fc.out_features)
    weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
    criterion = nn.CrossEntropyLoss(weight=weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loader = DataLoader(FilmDataset(train, TrainPreset(config)), batch_size=recipe.batch_size, shuffle=True,
                        drop_last=len(train) > recipe.batch_size, num_workers=workers,
                        generator=torch.Generator().manual_seed(recipe.seed))
    total, warmup = recipe.epochs * len(loader), int(recipe.warmup_epochs * len(loader))
    labels = np.array([s.label for s in val])
    history, step, first = [], 0, 1
    if state_file is not None and state_file.is_file():
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate((3, tuple(saved["python_rng"]), saved["python_gauss"]))
        history, step, first = saved["history"], saved["step"], len(saved["history"]) + 1
        print(f"resumed after epoch {first - 1} of {recipe.epochs} ({state_file})", flush=True)
    for epoch in range(first, recipe.epochs + 1):
        started, model = time.perf_counter(), model.train()
        losses = []
        for images, targets, masks, known in tqdm(loader, desc=f"epoch {epoch}/{recipe.epochs}", leave=False):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, warmup, recipe.lr)
            logits, features = activation_map(model, images)
            loss = criterion(logits, targets)
            if recipe.box_weight and positive is not None:
                loss = loss + recipe.box_weight * localisation_loss(model, features, masks, known, positive)
            update(optimizer, loss)
            step += 1
            losses.append(loss.item())
        probabilities = forward_films(model, val, config, workers)[0]
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_auc": auc(labels, probabilities, positive),
               "seconds": time.perf_counter() - started}
        history.append(row)
        print(f"epoch {epoch}: loss {row['train_loss']:.4f}, val AUC {row['val_auc']:.4f}, {row['seconds']:.0f} s",
              flush=True)
        if on_epoch:
            on_epoch(row, model)
        if state_file is not None:
            temporary = state_file.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                        "step": step, "generator": loader.generator.get_state(), "torch_rng": torch.get_rng_state(),
                        "python_rng": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}, temporary)
            temporary.replace(state_file)
    return history


def auc(labels: np.ndarray, probabilities: np.ndarray, positive: int | None) -> float:
    """The positive class's AUC, or the macro one-vs-rest AUC of a multi-class model."""
    if positive is not None:
        return roc_auc(labels == positive, probabilities[:, positive])
    return float(np.nanmean([roc_auc(labels == k, probabilities[:, k]) for k in range(probabilities.shape[1])]))
