"""The population check of a user's own model (training.own_population), on a tiny tree made from the committed
example X-rays and a tiny ResNet-18: no data set needed."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.data import image_files
from cxr.paths import EXAMPLE_XRAYS
from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint
from cxr_core.population import CHECKPOINT_KEY, KINDS, CheckedModel, PopulationSettings, outside
from cxr_core.preprocessing import EvalPreset
from tests.handler_support import synthetic_xray, write_tiny_checkpoint
from training.own_population import fit_own_check

OTHER_SOURCES = EXAMPLE_XRAYS.parent / "other_sources"
SPLIT_OF = ["train"] * 6 + ["val"] * 2 + ["test"] * 2  # of each class's 10 example X-rays


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict[str, Path]:
    """The user's tree (links to the example X-rays), a tiny checkpoint, a folder of re-encoded copies of the
    user's films and a folder of synthetic films of another kind."""
    root = tmp_path_factory.mktemp("own")
    for name in ("NORMAL", "PNEUMONIA"):
        for path, split in zip(image_files(EXAMPLE_XRAYS / name), SPLIT_OF, strict=True):
            (root / "tree" / split / name).mkdir(parents=True, exist_ok=True)
            (root / "tree" / split / name / path.name).symlink_to(path)
    copies, synthetic = root / "copies", root / "synthetic"
    for folder in (copies, synthetic):
        folder.mkdir()
    for path in image_files(root / "tree" / "train", "*/*"):  # another copy of the data: resized, PNG
        Image.open(path).convert("L").resize((150, 150)).save(copies / f"{path.stem}.png")
    for index in range(12):
        gray = np.roll(synthetic_xray(200 + 10 * index, 180), 7 * index, axis=1)
        Image.fromarray(gray, mode="L").save(synthetic / f"film{index}.png")
    return {"tree": root / "tree", "checkpoint": write_tiny_checkpoint(root / "model.pt"), "copies": copies,
            "synthetic": synthetic}


def fit(user: dict[str, Path], out: Path, **options) -> dict:
    return fit_own_check(user["checkpoint"], name="mine", data_tree=user["tree"], output=out / "model.pt",
                         report_dir=out / "report", intended_population="the user's test films",
                         model_card="runs/models/mine/model_card.md", threads=1,
                         **{"data_root": None, "own_source": None, **options})


def test_the_check_is_stored_loads_and_scores_and_a_copy_of_the_data_is_not_a_negative(user, tmp_path):
    summary = fit(user, tmp_path, others=[user["synthetic"], user["copies"], OTHER_SOURCES])
    assert set(summary["excluded_sources"]) == {"copies"}  # the user's own films again: same source
    assert summary["excluded_sources"]["copies"]["share"] == 1.0
    assert summary["groups"]["copies/train"]["population"] == "same source"
    assert summary["groups"]["own/val"]["population"] == "own"
    assert summary["groups"]["synthetic/test"]["population"] == "other"
    assert set(summary["negatives"]) == {"synthetic", "other_sources"} == set(summary["loso"])
    assert (tmp_path / "report" / "population.md").is_file() and (tmp_path / "report" / "population.json").is_file()

    checkpoint = load_checkpoint(tmp_path / "model.pt")
    check = checkpoint[CHECKPOINT_KEY]
    assert check["kind"] in KINDS and check["method"] == summary["method"]
    assert check["model_card"] == "runs/models/mine/model_card.md" and check["metrics"]["limit"] == check["limit"]
    assert PopulationSettings.from_dict(check).intended_population == "the user's test films"
    preset = EvalPreset(ServingConfig.from_checkpoint(checkpoint).preprocessing)
    val = image_files(user["tree"] / "val", "*/*")
    with torch.no_grad():
        _, scores = CheckedModel(model_from_checkpoint(checkpoint), check).eval()(
            torch.stack([preset.load(path) for path in val]))
    # the fused graph decides as the fit reported
    assert outside(scores.numpy(), check["limit"]).mean() == pytest.approx(summary["groups"]["own/val"]["flagged"])


def test_a_source_of_the_data_root_that_shares_films_is_own_population(user, tmp_path):
    """As rsna/ and multiclass/NORMAL: the user's source is left out by name, the other one found by pixels."""
    root = tmp_path / "data"
    for path in image_files(user["tree"], "*/*/*"):
        (root / "rsna" / path.parent.parent.name / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "rsna" / path.parent.parent.name / path.parent.name / path.name).symlink_to(path)
    for index, path in enumerate(image_files(user["copies"])[:4] + image_files(user["synthetic"])):
        folder = root / "multiclass" / ("train" if index % 3 else "val") / ("NORMAL" if index < 4 else "COVID19")
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").resize((224, 224)).save(folder / f"{index}.jpg")
    summary = fit(user, tmp_path / "fit", data_root=root, own_source="rsna")
    assert set(summary["excluded_sources"]) == {"crd_normal"} and set(summary["loso"]) == {"crd_covid"}
    assert not any(key.startswith("rsna/") for key in summary["groups"])
    with pytest.raises(ValueError, match="own_source 'adults'"):
        fit(user, tmp_path / "fit", data_root=root, own_source="adults")


def test_without_negatives_the_check_is_one_class(user, tmp_path):
    summary = fit(user, tmp_path)
    check = load_checkpoint(tmp_path / "model.pt")[CHECKPOINT_KEY]
    assert check["kind"] == "gaussian" and summary["method"] == "gaussian, layer3-4, 32 components"
    assert summary["loso"] == {} and summary["excluded_sources"] == {} and summary["negatives"] == {}
    assert set(summary["groups"]) >= {"own/train", "own/val", "own/test"}
