"""A narrowed class (cxr_core.population NARROW_KEY): a film whose most likely class is the narrowed one and
that its second logistic layer scores outside is refused; every other answer stands. The fused graph, the
exported files, the fit's own reading of the rule, and the shipped cxr4 on adult films."""

import json

import numpy as np
import pytest
import torch

from cxr_core.backends import TorchBackend
from cxr_core.checkpoint import (
    ServingConfig,
    load_checkpoint,
    model_from_checkpoint,
    serving_config,
    write_checkpoint,
)
from cxr_core.population import CHECKPOINT_KEY, NARROW_KEY, TAPS, CheckedModel, outside, resnet_forward
from cxr_core.preprocessing import EvalPreset
from export.exporters import export_onnx, export_torchscript
from tests.conftest import REPO, required_dataset
from tests.handler_support import features_of, inside_and_outside_images, make_handler, run, write_tiny_checkpoint
from training.narrow_class import CHILDREN, served_scores
from training.population_data import catalog


def write_narrowed(folder, narrow_said_class: bool):
    """A tiny model whose own check lets both test images in, with a narrow rule whose logistic layer scores the
    second image outside; the narrowed class is the class the model says for that image, or the other one."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(folder / "model.pt")
    checkpoint = load_checkpoint(folder / "model.pt")
    images = list(inside_and_outside_images())
    inside, outside = features_of(checkpoint, images)
    column = int((outside - inside).abs().argmax())
    weights = torch.zeros(len(inside), 1)
    weights[column, 0] = 4.0 / float(outside[column] - inside[column])
    preset = EvalPreset(ServingConfig.from_checkpoint(checkpoint).preprocessing)
    with torch.no_grad():
        said = int(model_from_checkpoint(checkpoint)(preset.load(images[1])[None])[0].argmax())
    narrow = {"class_index": said if narrow_said_class else 1 - said, "limit": 0.5, "center": inside.clone(),
              "scale": torch.ones(len(inside)), "weights": weights, "bias": torch.tensor([-2.0])}
    check = {"kind": "logistic", "taps": list(TAPS), "center": inside.clone(), "scale": torch.ones(len(inside)),
             "weights": torch.zeros(len(inside), 1), "bias": torch.tensor([-5.0]), "limit": 0.5,
             "intended_population": "children, for NORMAL", "model_card": "docs/model_cards/test.md",
             NARROW_KEY: narrow}
    write_checkpoint(folder / "model.pt", {**checkpoint, CHECKPOINT_KEY: check})
    return folder, said


@pytest.fixture(scope="module")
def narrowed(tmp_path_factory):
    return write_narrowed(tmp_path_factory.mktemp("narrowed"), narrow_said_class=True)


def test_the_narrowed_answer_is_refused_and_the_other_image_answered(narrowed):
    folder, _ = narrowed
    answers, statuses = run(make_handler(folder), [{"body": image} for image in inside_and_outside_images()])
    assert 0 not in statuses and answers[0]["population"]["inside"] is True
    assert statuses[1][0] == 422 and answers[1]["error"] == "outside the model's population"
    assert answers[1]["intended_population"] == "children, for NORMAL"


def test_another_answer_of_the_same_film_stands(tmp_path):
    folder, said = write_narrowed(tmp_path / "other", narrow_said_class=False)
    answers, statuses = run(make_handler(folder), [{"body": image} for image in inside_and_outside_images()])
    assert statuses == {}
    assert answers[1]["label"] == ServingConfig.from_checkpoint(load_checkpoint(folder / "model.pt")).class_names[said]
    assert answers[1]["population"]["inside"] is True


def test_the_fit_reads_the_rule_as_the_graph_computes_it(narrowed):
    folder, _ = narrowed
    checkpoint = load_checkpoint(folder / "model.pt")
    model, check = model_from_checkpoint(checkpoint), checkpoint[CHECKPOINT_KEY]
    images = torch.randn(6, 1, 64, 64)
    with torch.no_grad():
        _, graph = CheckedModel(model, check).eval()(images)
        logits, features = resnet_forward(model, images)
    served = served_scores(check, model, logits.numpy(), features.numpy())
    np.testing.assert_allclose(served, graph.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["model.ts", "model.onnx"])
def test_exported_files_carry_the_rule(narrowed, tmp_path, name):
    folder, _ = narrowed
    checkpoint = load_checkpoint(folder / "model.pt")
    network = CheckedModel(model_from_checkpoint(checkpoint), checkpoint[CHECKPOINT_KEY]).eval()
    exporter = export_torchscript if name == "model.ts" else export_onnx
    exporter(network, serving_config(checkpoint), tmp_path / name)
    rows = [{"body": image} for image in inside_and_outside_images()]
    answers, statuses = run(make_handler(tmp_path, name), rows)
    assert 0 not in statuses and statuses[1][0] == 422


@pytest.mark.slow
def test_shipped_cxr4_answers_no_adult_normal_but_keeps_the_childrens():
    """rsna/ test: no adult film answered NORMAL (lung opacity or not); Kermany's test children: NORMAL answers
    kept but for at most 2% (the limit accepts 99% of each class of the children's val films)."""
    root = required_dataset("rsna").parent
    checkpoint = load_checkpoint("models/cxr4/model.pt")
    assert NARROW_KEY in checkpoint[CHECKPOINT_KEY]
    films = [film for film in catalog(root) if film.split == "test" and
             (film.folder == "rsna" or (film.folder == "pneumonia" and film.source in CHILDREN))]
    config = ServingConfig.from_checkpoint(checkpoint)
    backend = TorchBackend(model_from_checkpoint(checkpoint), config, check=checkpoint[CHECKPOINT_KEY])
    preset = EvalPreset(config.preprocessing)
    normal, limit = config.class_names.index("NORMAL"), float(checkpoint[CHECKPOINT_KEY]["limit"])
    said = {"rsna": [], "kermany": []}
    for start in range(0, len(films), 64):
        batch = films[start:start + 64]
        probabilities, population = backend.run(torch.stack([preset.load(film.path) for film in batch]))
        for film, p, score in zip(batch, probabilities, population, strict=True):
            said[film.source].append(int(p.argmax()) == normal and not outside(score, limit))
    assert len(said["rsna"]) == 280 and sum(said["rsna"]) == 0
    kermany_normal = [film.label == "NORMAL" for film in films if film.source == "kermany"]
    answered = sum(s for s, n in zip(said["kermany"], kermany_normal, strict=True) if n)
    assert answered >= 0.9 * 86  # 86 of its 234 test children's normals were answered NORMAL before narrowing


def test_the_cxr4_card_quotes_the_narrowing_report():
    """Each figure of the card's before/after table and the limit come from the committed report."""
    report = json.loads((REPO / "docs/population/cxr4_normal_children.json").read_text())
    card = (REPO / "docs/model_cards/cxr4.md").read_text()
    assert f"limit {report['summary']['limit']:.4f}" in " ".join(card.split())
    quoted = [row for row in report["table"] if row["split"] == "test" and row["source"] not in ("samples",)
              and (row["source"], row["label"]) != ("kermany", "PNEUMONIA")]
    assert len(quoted) == 8
    for row in quoted:
        assert (f"| {row['films']} | {row['NORMAL_before']} -> {row['NORMAL_after']} | "
                f"{row['refused_before']} -> {row['refused_after']} |") in card, row
