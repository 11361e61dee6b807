"""Class discovery from folders; unreadable files are reported and skipped, never a crash."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cxr.data import XrayFolder, collate_skip_invalid, discover_classes, manifest_sha256, resolve_data_root
from cxr.paths import EXAMPLE_XRAYS, REPO, data_root, samples_dir
from cxr_core.preprocessing import EvalPreset, PreprocessConfig


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


def test_one_data_root_for_every_command(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_DATA", raising=False)
    assert data_root() == (REPO.parent / "shared" / "data").resolve()  # not the current directory's ../shared
    assert resolve_data_root(None) == data_root() / "pneumonia"
    assert resolve_data_root(None, "multiclass") == data_root() / "multiclass"
    monkeypatch.setenv("CXR_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path / "pneumonia"
    assert samples_dir() == EXAMPLE_XRAYS  # no samples/ there: the committed examples
    (tmp_path / "samples").mkdir()
    assert samples_dir() == tmp_path / "samples"
    assert str(resolve_data_root("/other")) == "/other"
    (tmp_path / "train").mkdir()  # the old meaning (one data set's split root) is named as a mistake
    with pytest.raises(ValueError, match="data root"):
        data_root()


def test_example_xrays_are_small_attributed_and_labelled():
    paths = sorted(EXAMPLE_XRAYS.glob("*/*.jpeg"))
    assert {p.parent.name for p in paths} == {"NORMAL", "PNEUMONIA"} and len(paths) == 20
    assert sum(p.stat().st_size for p in EXAMPLE_XRAYS.rglob("*")) <= 1024 * 1024
    readme = (EXAMPLE_XRAYS / "README.md").read_text()
    assert "CC BY 4.0" in readme and all(p.name in readme for p in paths)


def test_real_splits_have_the_documented_classes(pneumonia_data):
    for split in ("train", "val", "test"):
        assert discover_classes(pneumonia_data / split) == ["NORMAL", "PNEUMONIA"]
