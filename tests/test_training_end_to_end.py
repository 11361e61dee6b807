"""A tiny training run on a few real X-rays writes a checkpoint that evaluates and resumes."""

import json

import pytest

from cxr_core.checkpoint import load_checkpoint
from training import evaluate, train

pytestmark = pytest.mark.slow

PER_CLASS = {"train": 12, "val": 8, "test": 8}


@pytest.fixture(scope="module")
def tiny_tree(xray_tree, tmp_path_factory):
    """Symlinks to a few real images per class and split (nothing is copied)."""
    root = tmp_path_factory.mktemp("tiny")
    for split, count in PER_CLASS.items():
        for class_dir in sorted((xray_tree / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:count]:
                (target / path.name).symlink_to(path.resolve())
    return root


def run_training(tree, output_dir, *extra):
    args = train.get_args_parser().parse_args(
        ["--data", str(tree), "--arch", "resnet18", "--image-size", "64", "--epochs", "2", "--batch-size", "8",
         "--workers", "0", "--output-dir", str(output_dir), "--half-checkpoint", *extra]
    )
    return train.main(args)


def test_train_evaluate_and_resume(tiny_tree, tmp_path):
    output_dir = tmp_path / "run"
    summary = run_training(tiny_tree, output_dir)
    for name in ("model.pt", "best.pt", "last.pt", "metrics.csv", "curves.png", "metrics.json",
                 "reports/val.json", "reports/test.md", "reports/test_roc.png", "reports/test_confusion.png"):
        assert (output_dir / name).is_file(), name
    checkpoint = load_checkpoint(output_dir / "model.pt")
    assert checkpoint["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert checkpoint["positive_class"] == "PNEUMONIA"
    assert 0.0 <= checkpoint["threshold"] <= 1.0
    assert checkpoint["threshold"] == summary["threshold"]
    assert checkpoint["metrics"]["val"]["sensitivity"] >= 0.95  # the recall-first threshold, on val
    assert checkpoint["metrics"]["test"]["n"] == 2 * PER_CLASS["test"]
    assert checkpoint["preprocessing"]["image_size"] == 64
    assert len(checkpoint["data_manifest_sha256"]) == 64
    assert checkpoint["train_config"]["arch"] == "resnet18"
    assert len(open(output_dir / "metrics.csv").read().strip().splitlines()) == 1 + 2

    # The written checkpoint evaluates on its own, reproducing the test figures stored in it.
    eval_args = evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(output_dir / "model.pt"), "--data", str(tiny_tree), "--split", "test",
         "--output-dir", str(tmp_path / "eval"), "--workers", "0", "--bootstrap", "50"]
    )
    report = evaluate.main(eval_args)
    assert report["n"] == 16
    assert report["roc_auc"] == pytest.approx(checkpoint["metrics"]["test"]["roc_auc"], abs=0.02)
    assert json.loads((tmp_path / "eval" / "test.json").read_text())["n"] == 16

    # --resume continues after the last finished epoch.
    last = load_checkpoint(output_dir / "last.pt")
    assert last["epoch"] == 2
    resumed_dir = tmp_path / "resumed"
    run_training(tiny_tree, resumed_dir, "--epochs", "1", "--skip-test")
    run_training(tiny_tree, resumed_dir, "--resume", str(resumed_dir / "last.pt"), "--skip-test")
    assert len(open(resumed_dir / "metrics.csv").read().strip().splitlines()) == 1 + 2
    assert load_checkpoint(resumed_dir / "last.pt")["epoch"] == 2
