"""Class discovery from folders; unreadable files are reported and skipped, never a crash."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cxr.data import XrayFolder, collate_skip_invalid, discover_classes, manifest_sha256, resolve_data_root
from cxr.preprocessing import EvalPreset, PreprocessConfig


def make_tree(root, counts=None):
    counts = counts or {"NORMAL": 3, "PNEUMONIA": 4}
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(folder / f"{index}.jpeg")
    return root


def test_classes_come_from_folders(tmp_path):
    make_tree(tmp_path, {"TUBERCULOSIS": 1, "NORMAL": 1, "COVID19": 1, "PNEUMONIA": 1})
    assert discover_classes(tmp_path / "train") == ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    dataset = XrayFolder(tmp_path / "train")
    assert dataset.class_counts() == [1, 1, 1, 1]


def test_missing_or_single_class_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        discover_classes(tmp_path / "nope")
    (tmp_path / "one" / "A").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least 2"):
        discover_classes(tmp_path / "one")


def test_unknown_class_in_a_split_is_an_error(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError, match="not among"):
        XrayFolder(tmp_path / "train", class_names=["NORMAL", "OTHER"])


def test_bad_files_are_reported_and_skipped(tmp_path, caplog):
    make_tree(tmp_path)
    good = (tmp_path / "train" / "NORMAL" / "0.jpeg").read_bytes()
    (tmp_path / "train" / "NORMAL" / "truncated.jpeg").write_bytes(good[: len(good) // 3])
    (tmp_path / "train" / "PNEUMONIA" / "notes.jpeg").write_text("not an image")
    (tmp_path / "train" / "PNEUMONIA" / "empty.png").write_bytes(b"")
    dataset = XrayFolder(tmp_path / "train", EvalPreset(PreprocessConfig(image_size=32)))
    assert len(dataset) == 10
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip_invalid)
    with caplog.at_level(logging.WARNING):
        batches = [batch for batch in loader if batch is not None]
    images = torch.cat([batch[0] for batch in batches])
    assert images.shape == (7, 1, 32, 32)
    assert sorted(p.split("/")[-1] for p in dataset.skipped) == ["empty.png", "notes.jpeg", "truncated.jpeg"]
    assert "truncated.jpeg" in caplog.text and "notes.jpeg" in caplog.text


def test_collate_of_an_all_bad_batch_is_none():
    assert collate_skip_invalid([None, None]) is None


def test_manifest_hash_tracks_the_files(tmp_path):
    make_tree(tmp_path)
    before = manifest_sha256([XrayFolder(tmp_path / "train")])
    assert before == manifest_sha256([XrayFolder(tmp_path / "train")])
    Image.new("L", (8, 8)).save(tmp_path / "train" / "NORMAL" / "extra.jpeg")
    assert manifest_sha256([XrayFolder(tmp_path / "train")]) != before


def test_data_root_resolution(monkeypatch):
    monkeypatch.delenv("CXR_DATA", raising=False)
    assert str(resolve_data_root(None)) == "../shared/data/pneumonia"
    monkeypatch.setenv("CXR_DATA", "/data/x")
    assert str(resolve_data_root(None)) == "/data/x"
    assert str(resolve_data_root("/other")) == "/other"


def test_real_splits_have_the_documented_classes(data_root):
    for split in ("train", "val", "test"):
        assert discover_classes(data_root / split) == ["NORMAL", "PNEUMONIA"]
