"""The population check: its fused graph, its fitting, the three handler settings, export parity, the
Kermany-copy finder and the shipped checks."""

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.paths import EXAMPLE_XRAYS
from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint, serving_config, write_checkpoint
from cxr_core.population import CHECKPOINT_KEY, TAPS, CheckedModel, population_score, resnet_forward
from cxr_core.preprocessing import EvalPreset
from export.exporters import export_aoti, export_onnx, export_torchscript, quantize_onnx_int8
from tests.handler_support import (
    OTHER_SOURCES,
    FakeContext,
    assert_same_answer,
    features_of,
    inside_and_outside_images,
    make_handler,
    run,
    synthetic_xray,
    write_tiny_checkpoint,
)
from training.fit_population import choose, fit_gaussian, fit_logistic, flagged, tap_columns, with_limit
from training.population_data import catalog, with_rsna_classes

REPO_MODELS = EXAMPLE_XRAYS.parent.parent.parent / "models"
@pytest.fixture(scope="module")
def checked_dir(tmp_path_factory):
    """A tiny checkpoint whose check puts the first image inside and the second outside: one feature, the one
    that differs most between them, decides, and the limit lies half-way."""
    folder = tmp_path_factory.mktemp("checked")
    write_tiny_checkpoint(folder / "model.pt")
    checkpoint = load_checkpoint(folder / "model.pt")
    inside, outside = features_of(checkpoint, list(inside_and_outside_images()))
    column = int((outside - inside).abs().argmax())
    weights = torch.zeros(len(inside), 1)
    weights[column, 0] = 4.0 / float(outside[column] - inside[column])
    check = {"kind": "logistic", "taps": list(TAPS), "center": inside.clone(), "scale": torch.ones(len(inside)),
             "weights": weights, "bias": torch.tensor([-2.0]), "limit": 0.5,
             "intended_population": "synthetic test films", "model_card": "docs/model_cards/test.md"}
    write_checkpoint(folder / "model.pt", {**checkpoint, CHECKPOINT_KEY: check})
    return folder


def test_fused_graph_gives_the_model_logits_and_the_fitting_formula(checked_dir):
    checkpoint = load_checkpoint(checked_dir / "model.pt")
    model, check = model_from_checkpoint(checkpoint), checkpoint[CHECKPOINT_KEY]
    images = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        logits, scores = CheckedModel(model, check).eval()(images)
        plain = model(images)
        features = resnet_forward(model, images)[1]
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)
    expected = population_score(features, check["center"], check["scale"], check["weights"], check["bias"],
                                "logistic")
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


def test_fitting_separates_sources_and_the_limit_accepts_its_share_of_val(tmp_path):
    model = model_from_checkpoint(load_checkpoint(write_tiny_checkpoint(tmp_path / "model.pt")))
    columns = tap_columns(model, TAPS)
    assert columns.sum() == 2 * (64 + 128 + 256 + 512)  # ResNet-18: mean and std of every stage's channels
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(16, len(columns)))  # feature statistics vary along a few directions

    def films(count, offset=0.0):
        latent = rng.normal(size=(count, 16))
        latent[:, :4] += offset  # another source: elsewhere along some of those directions
        return latent @ mixing + 0.3 * rng.normal(size=(count, len(columns)))

    own, own_val, other, other_test = films(1500), films(1000), films(800, 4.0), films(400, 4.0)
    for check in (fit_logistic(own, other, columns, 0.1), fit_gaussian(own, columns, 16)):
        check = with_limit(check, [own_val])
        assert flagged(check, own_val) == pytest.approx(0.01, abs=0.002), check["kind"]
        assert flagged(check, films(1000)) <= 0.03, check["kind"]  # new own films: about 1%
        assert flagged(check, other_test) >= 0.9, check["kind"]


@pytest.mark.parametrize("setting", ["refuse", "warn", "off"])
def test_the_three_settings(checked_dir, setting):
    inside, outside = inside_and_outside_images()
    handler = make_handler(checked_dir, population_check=setting)
    answers, statuses = run(handler, [{"body": inside}, {"body": outside}])
    assert statuses.get(0) is None and answers[0]["population"]["inside"] is (None if setting == "off" else True)
    if setting == "refuse":
        assert statuses[1][0] == 422
        body = answers[1]
        assert body["error"] == "outside the model's population" and body["code"] == 422
        assert body["population"]["inside"] is False and body["population"]["score"] > body["population"]["limit"]
        assert body["intended_population"] == "synthetic test films"
        assert body["model_card"] == "docs/model_cards/test.md"
    elif setting == "warn":
        assert 1 not in statuses
        assert answers[1]["population"]["inside"] is False
        assert answers[1]["population"]["intended_population"] == "synthetic test films"
        assert answers[1]["label"] in ("NORMAL", "PNEUMONIA")
    else:
        assert 1 not in statuses and answers[1]["population"] == {"inside": None, "check": "off"}


def test_an_unknown_setting_fails_the_load_naming_it(checked_dir):
    with pytest.raises(ValueError, match="population_check: 'maybe'"):
        make_handler(checked_dir, population_check="maybe")


def test_a_refusal_names_the_image_counts_its_reason_and_spares_the_batch(checked_dir):
    inside, outside = inside_and_outside_images()
    handler = make_handler(checked_dir)
    context = FakeContext(".", "model.pt")
    # TorchServe hands a JSON body to the handler decoded.
    rows = [{"body": {"instances": [base64.b64encode(image).decode() for image in (inside, outside)]}},
            {"body": inside}]
    answers = handler.handle(rows, context)
    assert context.statuses[0][0] == 422 and answers[0]["image"] == 1
    assert 1 not in context.statuses and answers[1]["population"]["inside"] is True
    assert ("counter", "CxrRejected", 1, {"Reason": "outside_population"}) in handler.context.metrics.calls


def test_describe_says_whom_the_model_is_for(checked_dir):
    handler = make_handler(checked_dir)
    context = FakeContext(".", "model.pt")
    context.headers[0] = {"describe": "True"}
    [described] = handler.handle([{"body": b""}], context)
    assert described["intended_population"] == "synthetic test films"
    assert described["model_card"] == "docs/model_cards/test.md" and described["population_check"] == "refuse"


@pytest.mark.parametrize("name", ["model.ts", "model.onnx", "model.int8.onnx",
                                  pytest.param("model.pt2", marks=pytest.mark.slow, id="model.pt2-compiles-cpp")])
def test_every_exported_file_carries_the_check(checked_dir, tmp_path, name):
    """TorchScript, ONNX and AOTInductor give the eager probabilities and score within 1e-4; int8 keeps both
    decisions. The AOTInductor case compiles C++ (12 s): in `make test`, not in the fast lane."""
    checkpoint = load_checkpoint(checked_dir / "model.pt")
    network = CheckedModel(model_from_checkpoint(checkpoint), checkpoint[CHECKPOINT_KEY]).eval()
    config = serving_config(checkpoint)
    if name == "model.ts":
        export_torchscript(network, config, tmp_path / name)
    elif name == "model.pt2":
        export_aoti(network, config, tmp_path / name)
    else:
        export_onnx(network, config, tmp_path / "model.onnx")
    if name == "model.int8.onnx":
        preset = EvalPreset(ServingConfig.from_checkpoint(checkpoint).preprocessing)
        calibration = np.stack([preset(Image.fromarray(np.roll(synthetic_xray(), shift, axis=1), mode="L")).numpy()
                                for shift in range(0, 160, 10)])
        quantize_onnx_int8(tmp_path / "model.onnx", tmp_path / name, calibration)
    rows = [{"body": image} for image in inside_and_outside_images()]
    eager, _ = run(make_handler(checked_dir, population_check="warn"), rows)
    answers, statuses = run(make_handler(tmp_path, name, population_check="warn"), rows)
    assert statuses == {}
    for answer, reference in zip(answers, eager, strict=True):
        assert answer["population"]["inside"] == reference["population"]["inside"]
        if name != "model.int8.onnx":
            assert answer["population"]["score"] == pytest.approx(reference["population"]["score"], abs=1e-4)
            assert_same_answer(answer, reference)


def test_the_kermany_copy_finder(tmp_path):
    """A CRD Normal film that is a Kermany NORMAL film squashed to 224x224 is own population, not a negative."""
    gray = synthetic_xray(400, 300)
    for folder, name, image in [("pneumonia/train/NORMAL", "IM-1.jpeg", Image.fromarray(gray, mode="L")),
                                ("pneumonia/train/PNEUMONIA", "p.jpeg", Image.fromarray(gray[:, ::-1], mode="L")),
                                ("multiclass/train/NORMAL", "copy.jpg",
                                 Image.fromarray(gray, mode="L").resize((224, 224))),
                                ("multiclass/train/NORMAL", "adult.jpg",
                                 Image.fromarray(np.roll(gray, 90, axis=0).T.copy(), mode="L").resize((224, 224)))]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / folder / name, quality=90)
    sources = {film.path.name: film.source for film in catalog(tmp_path)}
    assert sources == {"IM-1.jpeg": "kermany", "p.jpeg": "kermany", "copy.jpg": "kermany_in_crd",
                       "adult.jpg": "crd_normal"}


def test_rsna_films_get_their_rsna_class_and_the_rule_chooses_by_held_out_films(tmp_path):
    """cxr4's negatives are RSNA films with findings (not its own RSNA normals): the manifest's class tells them
    apart; with held-out films to flag, the rule takes the candidate flagging most of their val films among those
    that keep the own val films."""
    classes = {"train/NO_OPACITY/a.jpeg": "Normal", "train/NO_OPACITY/b.jpeg": "No Lung Opacity / Not Normal",
               "val/OPACITY/c.jpeg": "Lung Opacity"}
    for name in classes:
        (tmp_path / "rsna" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_xray(), mode="L").save(tmp_path / "rsna" / name)
    (tmp_path / "rsna" / "manifest.csv").write_text("".join(f"{k},{v}\n" for k, v in [("file", "rsna_class"),
                                                                                      *classes.items()]))
    films = with_rsna_classes(catalog(tmp_path), tmp_path)
    assert {f"{film.split}/{film.path.parent.name}/{film.path.name}": film.label for film in films} == classes
    rows = {name: {"own_val": own_val, "loso": {}, "held_out": {"rsna findings": {"val": val, "test": 1 - val}}}
            for name, own_val, val in (("a", 0.01, 0.4), ("b", 0.01, 0.5), ("c", 0.05, 0.9))}
    assert choose(rows, "rsna findings") == "b"


@pytest.mark.parametrize("name", ["pneumonia", "cxr4"])
def test_the_shipped_models_carry_a_check(name):
    checkpoint = load_checkpoint(REPO_MODELS / name / "model.pt")
    check = checkpoint[CHECKPOINT_KEY]
    assert check["kind"] in ("logistic", "gaussian") and check["limit"] > 0
    assert check["model_card"] == f"docs/model_cards/{name}.md" and check["intended_population"]


def test_the_pneumonia_check_flags_exactly_the_listed_samples(real_samples):
    """The goal is that it flags none of the 40 samples; it flags one (docs/model_cards/pneumonia.md)."""
    from tests.conftest import OUTSIDE_POPULATION_SAMPLES

    handler = make_handler(REPO_MODELS / "pneumonia", population_check="warn")
    answers, _ = run(handler, [{"body": path.read_bytes()} for path in real_samples])
    flagged = [path.name for path, answer in zip(real_samples, answers, strict=True)
               if answer["population"]["inside"] is False]
    assert tuple(flagged) == OUTSIDE_POPULATION_SAMPLES


def test_the_pneumonia_check_accepts_the_example_xrays_and_flags_other_sources():
    handler = make_handler(REPO_MODELS / "pneumonia", population_check="warn")
    examples = sorted(EXAMPLE_XRAYS.glob("*/*.jp*g"))
    others = sorted(OTHER_SOURCES.glob("*.jp*g"))
    assert len(examples) == 20 and others
    answers, _ = run(handler, [{"body": path.read_bytes()} for path in examples + others])
    assert [a["population"]["inside"] for a in answers[:len(examples)]] == [True] * len(examples)
    assert [a["population"]["inside"] for a in answers[len(examples):]] == [False] * len(others)
