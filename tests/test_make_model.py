"""`make model` end to end on a small folder made from the committed example X-rays (two classes, 60 films, one
epoch): every step, the archives, a resumed run, the bad inputs that stop it, and the result served by a real
TorchServe. The fine-tuning pieces (boxes, the starting model's last layer) are checked on their own."""

import shutil
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import server
from cxr.data import image_files
from cxr.paths import EXAMPLE_XRAYS, REPO
from cxr.server import free_ports
from cxr_core.checkpoint import load_checkpoint
from training import fine_tune as fine_tune_module
from training.fine_tune import Recipe, Sample, box_mask, fine_tune, parse_boxes, starting_model
from training.make_model import Request, Run, make_model
from training.own_data import DataError

SHIPPED = REPO / "models" / "pneumonia" / "model.pt"
CROPS = 3  # distinct films per example X-ray: 30 per class


@pytest.fixture(scope="module")
def own_films(tmp_path_factory) -> Path:
    """<CLASS>/<film> without splits: each example X-ray shrunk to 160 px and cropped three ways."""
    folder = tmp_path_factory.mktemp("own")
    for path in image_files(EXAMPLE_XRAYS, "*/*"):
        image = Image.open(path).convert("L")
        image.thumbnail((160, 160))
        width, height = image.size
        (folder / path.parent.name).mkdir(exist_ok=True)
        for k in range(CROPS):
            image.crop((k, k, width - k, height)).save(folder / path.parent.name / f"{path.stem}_{k}.jpeg",
                                                       quality=70 + 5 * k)
    return folder


def request(data: Path, **changes) -> Request:
    made = Request(name="ours", data=str(data), positive="PNEUMONIA", data_root=None)
    return replace(made, recipe=replace(made.recipe, epochs=1, batch_size=16), **changes)


def test_boxes_parse_and_land_on_the_squashed_input():
    assert parse_boxes("") == ()
    assert parse_boxes("10 20 30 40;0 0 5 5") == ((10, 20, 30, 40), (0, 0, 5, 5))
    with pytest.raises(ValueError, match="positive width"):
        parse_boxes("1 2 0 4")
    mask = box_mask([(0, 0, 50, 100)], (100, 200), 8)  # left half, top half of a 100 x 200 film
    assert mask.shape == (1, 8, 8)
    assert mask[0, :4, :4].all() and not mask[0, 4:].any() and not mask[0, :, 4:].any()


def test_the_box_mask_moves_with_the_augmented_film():
    """The random affine transform moves the boxes' mask exactly as it moves the film."""
    from cxr_core.preprocessing import PreprocessConfig, TrainPreset

    config = PreprocessConfig(image_size=64)
    preset = TrainPreset(config, degrees=15, translate=0.2, brightness=0.0, contrast=0.0)
    film = Image.new("L", (200, 100))
    film.paste(255, (20, 10, 90, 60))  # a white box where the finding is
    torch.manual_seed(0)
    for _ in range(5):
        tensor, mask = preset.with_mask(film, box_mask([(20, 10, 70, 50)], film.size, 64))
        bright = tensor[0] * config.std[0] + config.mean[0] > 0.5
        assert mask.shape == (1, 64, 64) and mask.sum() > 0
        assert (bright == (mask[0] > 0.5)).float().mean() > 0.97


def test_the_starting_model_keeps_each_class_role(tmp_path):
    """A data set whose positive class sorts first gets the shipped PNEUMONIA row as its positive row."""
    shipped = load_checkpoint(SHIPPED)
    for classes, positive in ((("NO_OPACITY", "OPACITY"), "OPACITY"), (("ABNORMAL", "NORMAL"), "ABNORMAL")):
        model, _ = starting_model(SHIPPED, classes, positive)
        row = classes.index(positive)
        assert torch.allclose(model.fc.weight[row].float(), shipped["state_dict"]["fc.weight"][1].float())
        assert torch.allclose(model.fc.weight[1 - row].float(), shipped["state_dict"]["fc.weight"][0].float())
    model, _ = starting_model(SHIPPED, ("A", "B", "C"), None)
    assert model.fc.out_features == 3
    assert torch.equal(model.layer1[0].conv1.weight.float(), shipped["state_dict"]["layer1.0.conv1.weight"].float())


def test_an_interrupted_training_resumes_after_its_last_epoch_as_if_never_stopped(tmp_path, monkeypatch):
    """Stopped in its second epoch and started again, the training goes on from the end of the first: the same
    history and the same weights as a run never stopped (measured: equal to the last bit on one machine; 1e-5 of
    slack for another)."""
    films = [Sample(path, int(path.parent.name == "PNEUMONIA"), None) for path in image_files(EXAMPLE_XRAYS, "*/*")]
    recipe = Recipe(epochs=2, batch_size=8)

    def train(state_file: Path | None) -> tuple[list, dict]:
        model, config = starting_model(SHIPPED, ("NORMAL", "PNEUMONIA"), "PNEUMONIA")
        config = replace(config, image_size=64)
        history = fine_tune(model, config, films, films, recipe, 1, workers=0, state_file=state_file)
        return history, model.state_dict()

    whole_history, whole = train(None)
    state_file, calls = tmp_path / "last_epoch.pt", []
    real_update = fine_tune_module.update

    def interrupted(optimizer, loss):
        calls.append(1)
        if len(calls) == 4:  # the second batch of the second epoch (20 films, 2 batches an epoch)
            raise KeyboardInterrupt
        real_update(optimizer, loss)

    monkeypatch.setattr(fine_tune_module, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(state_file)
    monkeypatch.setattr(fine_tune_module, "update", real_update)
    assert len(torch.load(state_file, weights_only=True)["history"]) == 1
    history, resumed = train(state_file)
    assert [row["epoch"] for row in history] == [1, 2]
    assert [row["val_auc"] for row in history] == pytest.approx([row["val_auc"] for row in whole_history], abs=1e-5)
    for name, tensor in whole.items():
        assert torch.allclose(resumed[name].float(), tensor.float(), atol=1e-5), name


def test_dicom_films_are_decoded_once_into_the_run_tree(tmp_path):
    """The steps read an ImageFolder tree: images are linked, DICOM films decoded as served and saved as PNG."""
    from loadtest.hostile import dicom_file
    from training.model_steps import _materialise
    from training.own_data import DataPlan, Film

    data = tmp_path / "mine"
    (data / "scans").mkdir(parents=True)
    pixels = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 13) % 4096
    (data / "scans" / "a.dcm").write_bytes(dicom_file(pixels, bits=12))
    jpeg = image_files(EXAMPLE_XRAYS, "NORMAL/*")[0]
    films = {"train": [Film(data / "scans" / "a.dcm", 1, None), Film(jpeg, 0, None)], "val": [], "test": []}
    plan = DataPlan(data, "ours", "csv_labels", ("NORMAL", "PNEUMONIA"), "PNEUMONIA", films, [], "", True, 0.0)
    origin = _materialise(plan, tmp_path / "tree")
    png = tmp_path / "tree" / "train" / "PNEUMONIA" / "scans__a.dcm.png"
    assert Image.open(png).size == (48, 64) and origin["train/PNEUMONIA/scans__a.dcm.png"] == str(data / "scans/a.dcm")
    linked = tmp_path / "tree" / "train" / "NORMAL" / jpeg.name
    assert linked.is_symlink() and linked.resolve() == jpeg.resolve()


def test_extra_films_that_copy_a_held_out_film_stay_out(tmp_path):
    """EXTRA= adds training films, never one whose pixels are a val or test film's (a leak into the figures)."""
    from training.model_steps import _extra_samples

    normal, pneumonia = image_files(EXAMPLE_XRAYS, "NORMAL/*")[:2], image_files(EXAMPLE_XRAYS, "PNEUMONIA/*")[0]
    extra = tmp_path / "extra"
    extra.mkdir()
    for path in (*normal, pneumonia):
        shutil.copy(path, extra / path.name)
    run = Run(request(tmp_path, extra=(f"NORMAL={extra}",)), tmp_path / "run", tmp_path / "store")
    kept = _extra_samples(run, ["NORMAL", "PNEUMONIA"], held=[pneumonia])
    assert sorted(sample.path.name for sample in kept) == sorted(path.name for path in normal)
    assert {sample.label for sample in kept} == {0}
    with pytest.raises(DataError, match="EXTRA=OTHER="):
        _extra_samples(replace(run, request=request(tmp_path, extra=(f"OTHER={extra}",))), ["NORMAL", "PNEUMONIA"],
                       held=[pneumonia])


def test_bad_inputs_stop_before_training(own_films, tmp_path):
    runs, store = tmp_path / "runs", tmp_path / "store"
    with pytest.raises(DataError, match="POSITIVE=<one of NORMAL, PNEUMONIA>"):
        make_model(request(own_films, positive=None), runs=runs, model_store=store)
    for served in ("cxr4", "adult"):
        with pytest.raises(DataError, match="already served"):
            make_model(request(own_films, name=served), runs=runs, model_store=store)
    store.mkdir()
    (store / "ours.mar").write_bytes(b"the user's archive")
    with pytest.raises(DataError, match="VERSION="):
        make_model(request(own_films), runs=runs, model_store=store)
    assert (store / "ours.mar").read_bytes() == b"the user's archive"
    assert not (runs / "ours" / "train").exists()
    made = request(own_films)
    for recipe in (replace(made.recipe, detail=128), replace(made.recipe, image_size=96, detail=96),
                   replace(made.recipe, detail=0)):
        with pytest.raises(DataError, match="DETAIL=.* below the input size"):
            make_model(replace(made, recipe=recipe), runs=runs, model_store=store)
    assert not (runs / "ours").exists()


def test_a_run_folder_of_other_settings_is_never_reused(own_films, tmp_path):
    run = Run(request(own_films), tmp_path / "ours", tmp_path / "store")
    run.load()
    run.finish("check", 1.0, {})
    other = Run(request(own_films, rule="youden"), tmp_path / "ours", tmp_path / "store")
    with pytest.raises(DataError, match=r"other settings \(rule 'recall' -> 'youden'\)"):
        other.load()


@pytest.mark.slow
@pytest.mark.integration
def test_one_command_from_folder_to_served_model(own_films, tmp_path, capsys):
    runs, store = tmp_path / "runs", tmp_path / "store"
    made = request(own_films)
    made = replace(made, recipe=replace(made.recipe, detail=64))  # films squashed to 64 px, then to the input size
    run = make_model(made, runs=runs, model_store=store)
    steps = run.state["steps"]
    assert list(steps) == ["check", "train", "calibrate", "gate", "population", "export", "archive", "report",
                           "card"]
    assert steps["check"]["counts"] == {"train": [22, 22], "val": [4, 4], "test": [4, 4]}
    assert {Path(p).name for p in steps["archive"]["archives"]} >= {"ours.mar", "ours_eager.mar", "ours_onnx.mar"}
    checkpoint = load_checkpoint(run.path("population", "model.pt"))
    assert checkpoint["class_names"] == ["NORMAL", "PNEUMONIA"] and 0.0 < checkpoint["threshold"] < 1.0
    assert checkpoint["population_check"]["limit"] > 0 and checkpoint["preprocessing"]["detail"] == 64
    assert checkpoint["population_check"]["model_card"] == str(run.path("model_card.md").resolve())  # refusals
    card = run.path("model_card.md").read_text()
    for section in ("## Model details", "## Intended use", "## Metrics", "## The population check",
                    "## Calibration", "## Time of each step"):
        assert section in card
    assert steps["train"]["seconds"] > 0 and all(facts["seconds"] >= 0 for facts in steps.values())
    # A second run resumes: every step is skipped, nothing is rewritten.
    archive_time = (store / "ours.mar").stat().st_mtime_ns
    capsys.readouterr()
    make_model(made, runs=runs, model_store=store)
    assert capsys.readouterr().out.count("done before") == 9
    assert (store / "ours.mar").stat().st_mtime_ns == archive_time
    # Served by a real TorchServe, as `make serve MODELS="... ours"` would.
    names = ["inference", "management", "metrics", "grpc_inference", "grpc_management"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    process = server.start(tmp_path / "serve", {"ours": "ours.mar"}, model_store=store, ports=ports, timeout=1200)
    try:
        from tests.serving_support import Client

        client = Client(ports, server.read_keys(tmp_path / "serve"))
        film = image_files(EXAMPLE_XRAYS, "PNEUMONIA/*")[0]
        status, answer = client.predict(film.read_bytes(), model="ours")
        assert status == 200, answer
        assert answer["model"] == "ours" and answer["label"] in ("NORMAL", "PNEUMONIA")
        assert set(answer) >= {"version", "probabilities", "threshold", "gate", "population"}
        status, refused = client.predict(b"not an image", model="ours")
        assert status == 400 and refused["error"].startswith("not an image")
    finally:
        server.stop_process(process)
        shutil.rmtree(tmp_path / "serve", ignore_errors=True)
        for port in ports.values():
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
