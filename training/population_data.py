"""The images a population check is fitted and judged on: every X-ray under the data root, by source and split,
and the frozen model's feature statistics of each (cxr_core.population.resnet_forward).

Sources: `kermany` (pneumonia/, pediatric, Guangzhou; multiclass/*/PNEUMONIA are copies of it and are left
out), `samples` (untouched Kermany test originals), and in multiclass/: `crd_normal` (COVID-19 Radiography
Database Normal: mostly adult), `kermany_in_crd` (the Kermany normals that database includes, found by their
pixels: own population, never a negative), `crd_covid` and `tbx11k` (TUBERCULOSIS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cxr.data import image_files
from cxr_core.population import resnet_forward
from cxr_core.preprocessing import EvalPreset

SPLITS = ("train", "val", "test")
MULTICLASS_SOURCES = {"NORMAL": "crd_normal", "COVID19": "crd_covid", "TUBERCULOSIS": "tbx11k"}
COPY_CORRELATION = 0.97  # thumbnail correlation above which a CRD Normal film is a Kermany film


@dataclass(frozen=True)
class Film:
    path: Path
    source: str
    split: str
    label: str
    folder: str  # pneumonia, multiclass or samples

    @property
    def squashed(self) -> bool:
        """Reached us already squashed to 224x224 (most Kermany train/val films and every CRD film)."""
        with Image.open(self.path) as image:
            return image.size == (224, 224)


def catalog(data_root: Path) -> list[Film]:
    """Every film under `data_root` (multiclass PNEUMONIA, copies of pneumonia/, left out)."""
    films = []
    for split in SPLITS:
        for label in ("NORMAL", "PNEUMONIA"):
            films += [Film(path, "kermany", split, label, "pneumonia")
                      for path in image_files(data_root / "pneumonia" / split / label)]
        for label in ("NORMAL", "COVID19", "TUBERCULOSIS", "PNEUMONIA"):
            source = MULTICLASS_SOURCES.get(label, "kermany")
            films += [Film(path, source, split, label, "multiclass")
                      for path in image_files(data_root / "multiclass" / split / label)]
    for label in ("NORMAL", "PNEUMONIA"):
        films += [Film(path, "samples", "test", label, "samples")
                  for path in image_files(data_root / "samples" / label)]
    return mark_kermany_copies(films)


def thumbnail(path: Path, side: int = 32) -> np.ndarray:
    """The film squashed to side x side, zero mean and unit norm (one row of a correlation matrix)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    pixels -= pixels.mean()
    return pixels / (np.linalg.norm(pixels) + 1e-6)


def mark_kermany_copies(films: list[Film]) -> list[Film]:
    """CRD Normal films whose thumbnail correlates >= COPY_CORRELATION with a Kermany NORMAL film become
    `kermany_in_crd`."""
    kermany = [film for film in films if film.source == "kermany" and film.label == "NORMAL"
               and film.folder == "pneumonia"]
    crd = [index for index, film in enumerate(films) if film.source == "crd_normal"]
    if not kermany or not crd:
        return films
    reference = np.stack([thumbnail(film.path) for film in tqdm(kermany, desc="Kermany thumbnails", leave=False)])
    candidates = np.stack([thumbnail(films[i].path) for i in tqdm(crd, desc="CRD thumbnails", leave=False)])
    best = (candidates @ reference.T).max(axis=1)
    marked = list(films)
    for index, correlation in zip(crd, best, strict=True):
        if correlation >= COPY_CORRELATION:
            film = films[index]
            marked[index] = Film(film.path, "kermany_in_crd", film.split, film.label, film.folder)
    return marked


class _Films(Dataset):
    def __init__(self, films: list[Film], preset: EvalPreset) -> None:
        self.films, self.preset = films, preset

    def __len__(self) -> int:
        return len(self.films)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preset.load(self.films[index].path)


def feature_statistics(model: torch.nn.Module, films: list[Film], preset: EvalPreset, device: str = "cpu",
                       batch_size: int = 64, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The frozen model's logits (len(films), classes) and the statistics the population check reads
    (len(films), features)."""
    loader = DataLoader(_Films(films, preset), batch_size=batch_size, num_workers=workers)
    model = model.to(device).eval()
    logits, features = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="features"):
            batch_logits, batch_features = resnet_forward(model, batch.to(device))
            logits.append(batch_logits.float().cpu().numpy())
            features.append(batch_features.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(features)
