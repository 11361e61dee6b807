"""ImageFolder trees (`<root>/{train,val,test}/<CLASS>/*`) that skip unreadable files instead of crashing."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from cxr.paths import data_root
from cxr_core.preprocessing import EvalPreset, InvalidImageError, TrainPreset, load_image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_files(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The image files matching `pattern` under `folder`, sorted (none when the folder does not exist)."""
    return sorted(path for path in Path(folder).glob(pattern)
                  if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
log = logging.getLogger(__name__)


def resolve_data_root(data: str | None = None, dataset: str = "pneumonia") -> Path:
    """An ImageFolder root with train/val/test: `--data` if given, else `dataset` under the data root."""
    return Path(data) if data else data_root() / dataset


def discover_classes(split_dir: str | os.PathLike) -> list[str]:
    """Class names are the sub-folder names, sorted (as torchvision's ImageFolder does)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no such data folder: {split_dir}")
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{split_dir}: need at least 2 class folders, found {classes}")
    return classes


class XrayFolder(Dataset):
    """One split of an ImageFolder tree. A file that fails to decode is logged with its path and yields None.

    Use `collate_skip_invalid` as the DataLoader's collate_fn so such files drop out of their batch.
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        transform: EvalPreset | TrainPreset | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        found = discover_classes(self.split_dir)
        self.class_names = list(class_names) if class_names is not None else found
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise ValueError(f"{self.split_dir}: class folders {unknown} are not among {self.class_names}")
        self.transform = transform
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(self.class_names):
            self.samples += [(path, index) for path in image_files(self.split_dir / name)]
        if not self.samples:
            raise ValueError(f"{self.split_dir}: no images found")
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.class_names)
        for target in self.targets:
            counts[target] += 1
        return counts

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        path, target = self.samples[index]
        try:
            tensor = self.transform.load(path) if self.transform is not None else load_image(path)
        except (InvalidImageError, OSError) as error:
            log.warning("skipping unreadable image %s: %s", path, error)
            self.skipped.append(str(path))
            return None
        return tensor, target, index


def collate_skip_invalid(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Default collation of the readable samples; None when none of the batch could be read."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def manifest_sha256(datasets: Sequence[XrayFolder]) -> str:
    """A fingerprint of the data a model saw: every file's split, class, name and size."""
    digest = hashlib.sha256()
    for dataset in datasets:
        for path, target in dataset.samples:
            line = f"{dataset.split_dir.name}/{dataset.class_names[target]}/{path.name}\t{path.stat().st_size}\n"
            digest.update(line.encode())
    return digest.hexdigest()
