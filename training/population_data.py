"""The images a population check is fitted and judged on: every X-ray under the data root, by source and split,
and the frozen model's feature statistics of each (cxr_core.population.resnet_forward).

Sources: `kermany` (pneumonia/, pediatric, Guangzhou; multiclass/*/PNEUMONIA are copies of it), `samples`
(untouched Kermany test originals), in multiclass/: `crd_normal` (COVID-19 Radiography Database Normal: adult
RSNA films), `kermany_in_crd` (the Kermany normals that database includes, found by their pixels: own population
of a Kermany model, never its negative), `crd_covid` and `tbx11k` (TUBERCULOSIS); and `rsna` (rsna/, adults,
RSNA Pneumonia Detection Challenge: one origin with `crd_normal`, 58 films in both).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cxr.data import image_files
from cxr_core.checkpoint import load_checkpoint
from cxr_core.population import resnet_forward
from cxr_core.preprocessing import EvalPreset

SPLITS = ("train", "val", "test")
MULTICLASS_SOURCES = {"NORMAL": "crd_normal", "COVID19": "crd_covid", "TUBERCULOSIS": "tbx11k"}
COPY_CORRELATION = 0.97  # thumbnail correlation above which two films are one (resized or re-encoded)
SAME_SOURCE_SHARE = 0.01  # a source with at least this share of its films in another set is of the same source
RSNA_FINDINGS = ("Lung Opacity", "No Lung Opacity / Not Normal")  # rsna/ manifest classes of films with findings


@dataclass(frozen=True)
class Film:
    path: Path
    source: str
    split: str
    label: str
    folder: str  # pneumonia, multiclass, samples, rsna (or the user's own folders: training.own_population)

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
        films += [Film(path, "rsna", split, path.parent.name, "rsna")
                  for path in image_files(data_root / "rsna" / split, "*/*")]
    for label in ("NORMAL", "PNEUMONIA"):
        films += [Film(path, "samples", "test", label, "samples")
                  for path in image_files(data_root / "samples" / label)]
    return mark_kermany_copies(films)


def with_rsna_classes(films: list[Film], data_root: Path) -> list[Film]:
    """The rsna/ films labelled by their RSNA class (manifest `rsna_class`: Normal, Lung Opacity, No Lung Opacity /
    Not Normal) instead of OPACITY / NO_OPACITY; the other films as they are."""
    manifest = Path(data_root) / "rsna" / "manifest.csv"
    if not manifest.is_file():
        return films
    with open(manifest, newline="") as handle:
        classes = {(manifest.parent / row["file"]).resolve(): row["rsna_class"] for row in csv.DictReader(handle)}
    return [replace(film, label=classes[film.path.resolve()]) if film.folder == "rsna" else film for film in films]


def thumbnail(path: Path, side: int = 32) -> np.ndarray:
    """The film squashed to side x side, zero mean and unit norm (one row of a correlation matrix)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    pixels -= pixels.mean()
    return pixels / (np.linalg.norm(pixels) + 1e-6)


def thumbnails(paths: Sequence[Path], desc: str = "thumbnails") -> np.ndarray:
    """One thumbnail row per path, (len(paths), 1024)."""
    rows = [thumbnail(path) for path in tqdm(paths, desc=desc, leave=False)]
    return np.stack(rows) if rows else np.zeros((0, 32 * 32), dtype=np.float32)


def copies(candidates: np.ndarray, reference: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Which rows of `candidates` are a film of `reference` (thumbnail correlation >= COPY_CORRELATION)."""
    if not len(candidates) or not len(reference):
        return np.zeros(len(candidates), dtype=bool)
    return np.concatenate([(candidates[start:start + chunk] @ reference.T).max(axis=1) >= COPY_CORRELATION
                           for start in range(0, len(candidates), chunk)])


def copied_share(candidates: np.ndarray, reference: np.ndarray) -> float:
    """The share of `candidates` that are copies of a film of `reference` (0 for none)."""
    return float(copies(candidates, reference).mean()) if len(candidates) else 0.0


def same_origin(thumbs: dict[str, np.ndarray]) -> dict[str, frozenset[str]]:
    """Each source (name -> its films' thumbnails) with the sources it shares films with, itself included (at
    least SAME_SOURCE_SHARE of either's films are copies of the other's). Leave-one-source-out leaves them out
    together: otherwise the source left out is still seen through its copies."""
    found = {source: {source} for source in thumbs}
    names = list(thumbs)
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            if max(copied_share(thumbs[first], thumbs[second]),
                   copied_share(thumbs[second], thumbs[first])) >= SAME_SOURCE_SHARE:
                found[first].add(second)
                found[second].add(first)
    return {source: frozenset(shared) for source, shared in found.items()}


def mark_kermany_copies(films: list[Film]) -> list[Film]:
    """CRD Normal films that are copies of a Kermany NORMAL film (`copies`) become `kermany_in_crd`."""
    kermany = [film.path for film in films if film.source == "kermany" and film.label == "NORMAL"
               and film.folder == "pneumonia"]
    crd = [index for index, film in enumerate(films) if film.source == "crd_normal"]
    if not kermany or not crd:
        return films
    found = copies(thumbnails([films[i].path for i in crd], "CRD thumbnails"),
                   thumbnails(kermany, "Kermany thumbnails"))
    marked = list(films)
    for index, copy in zip(crd, found, strict=True):
        if copy:
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
    workers = workers if len(films) > batch_size else 0  # one batch: not worth starting worker processes
    loader = DataLoader(_Films(films, preset), batch_size=batch_size, num_workers=workers)
    model = model.to(device).eval()
    logits, features = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="features"):
            batch_logits, batch_features = resnet_forward(model, batch.to(device))
            logits.append(batch_logits.float().cpu().numpy())
            features.append(batch_features.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(features)


def weights_sha256(checkpoint: Path) -> str:
    """What the features depend on: the weights and the preprocessing (a new threshold or temperature keeps them)."""
    loaded = load_checkpoint(checkpoint)
    digest = hashlib.sha256(json.dumps(loaded["preprocessing"], sort_keys=True, default=str).encode())
    for name, tensor in sorted(loaded["state_dict"].items()):
        digest.update(name.encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


def cached_features(model: torch.nn.Module, films: list[Film], preset: EvalPreset, cache: Path, checkpoint: Path,
                    device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """`feature_statistics`, kept in `cache` per film (by resolved path) for this checkpoint's weights: the feature
    pass is the slow part of a fit, and a re-fit, or a fit of another film list, computes only the films it lacks."""
    sha256 = weights_sha256(checkpoint)
    keys = [str(film.path.resolve()) for film in films]
    stored: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache) as found:
            if str(found["checkpoint"]) == sha256:
                stored = dict(found)
    known = {key: row for row, key in enumerate(stored.get("paths", np.zeros(0, dtype=str)).tolist())}
    missing = sorted({key for key in keys if key not in known})
    if missing:
        by_key = {str(film.path.resolve()): film for film in films}
        logits, features = feature_statistics(model, [by_key[key] for key in missing], preset, device)
        stored = {"paths": np.asarray([*known, *missing]),
                  "logits": np.concatenate([stored["logits"], logits]) if known else logits,
                  "features": np.concatenate([stored["features"], features]) if known else features}
        known = {key: row for row, key in enumerate(stored["paths"].tolist())}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **stored, checkpoint=sha256)
    rows = np.asarray([known[key] for key in keys], dtype=int)
    return stored["logits"][rows], stored["features"][rows]
