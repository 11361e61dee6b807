"""Integration: the cxr client library and command line (REST and gRPC) against the session's real TorchServe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr import cli
from cxr.client import Client as CxrClient
from cxr.client import PredictionError
from tests.conftest import SHIPPED_MODEL
from tests.handler_support import OTHER_SOURCES, assert_same_answer
from tests.serving_support import run_cli

pytestmark = pytest.mark.integration


def test_cli_explain_writes_the_overlay(served, capsys, sample_paths, tmp_path):
    out = tmp_path / "heatmap.png"
    code, [answer] = run_cli(served, capsys, "explain", str(sample_paths[-1]), "--out", str(out))
    assert code == 0 and answer["overlay"] == str(out) and answer["label"] in ("NORMAL", "PNEUMONIA")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _ = run_cli(served, capsys, "explain", str(sample_paths[-1]), "--out", str(out), "--model", "pneumonia")
    assert code == 1  # the ONNX archive does not explain


@pytest.fixture(scope="module")
def client(served):
    client = CxrClient(served.keys, ports=served.ports, timeout=30)
    yield client
    client.close()


def test_rest_and_grpc_give_the_same_answers(client, sample_paths):
    assert client.ping("rest") == client.ping("grpc") == "Healthy"
    for path in sample_paths[::4]:
        data = path.read_bytes()
        assert_same_answer(client.predict(data, protocol="grpc"), client.predict(data, protocol="rest"))


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_client_errors_name_the_problem(served, client, protocol):
    with pytest.raises(PredictionError) as refused:
        client.predict(b"not an image", protocol=protocol)
    assert refused.value.status == 400 and "not an image" in refused.value.message
    wrong_key = CxrClient({"inference": "wrong", "management": "wrong"}, ports=served.ports, retries=0)
    with pytest.raises(PredictionError) as unauthorised:
        wrong_key.predict(b"x", protocol=protocol)
    assert "Token Authorization failed" in unauthorised.value.message
    wrong_key.close()


def test_client_lists_models_with_workers(client):
    listed = {entry["modelName"]: entry for entry in client.models()}
    assert {"pneumonia", "pneumonia_eager"} <= set(listed)
    assert listed["pneumonia"]["workers"] and listed["pneumonia"]["modelVersion"] == "1.0"


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_cli_predict_prints_one_answer_per_image(served, capsys, sample_paths, protocol):
    images = [str(path) for path in sample_paths[:3]]
    code, answers = run_cli(served, capsys, "predict", "--protocol", protocol, *images)
    assert code == 0 and len(answers) == 3
    for path, answer in zip(sample_paths[:3], answers, strict=True):
        assert_same_answer(answer, served.predict(path.read_bytes())[1])


def test_cli_failures_print_their_error_and_exit_non_zero(served, capsys, sample_paths, tmp_path):
    junk = tmp_path / "junk.jpeg"
    junk.write_bytes(b"not an x-ray")
    code, answers = run_cli(served, capsys, "predict", str(sample_paths[0]), str(junk), str(tmp_path / "missing.png"))
    assert code == 1
    assert answers[0]["label"] in ("NORMAL", "PNEUMONIA")
    assert answers[1]["code"] == 400 and "not an image" in answers[1]["error"] and answers[1]["file"] == str(junk)
    assert answers[2] == {"file": str(tmp_path / "missing.png"), "code": 400, "error": "no such file"}


def test_dicom_over_rest_and_cli(served, capsys, sample_paths, tmp_path):
    import numpy as np

    from cxr_core.preprocessing import load_image
    from loadtest.hostile import dicom_file

    pixels = np.asarray(load_image(sample_paths[0]))
    dicom = tmp_path / "xray.dcm"
    dicom.write_bytes(dicom_file(pixels.astype(np.uint16) * 16, bits=12))
    status, answer = served.predict(dicom.read_bytes(), content_type="application/dicom")
    assert status == 200 and answer["label"] in ("NORMAL", "PNEUMONIA")
    code, [cli_answer] = run_cli(served, capsys, "predict", str(dicom))
    assert code == 0
    assert_same_answer(cli_answer, answer)


def test_cli_models_and_installed_entry_point(served, capsys):
    code, listed = run_cli(served, capsys, "models")
    assert code == 0 and {"pneumonia", "pneumonia_eager"} <= {entry["model"] for entry in listed}
    if SHIPPED_MODEL.is_file():
        [pneumonia] = [entry for entry in listed if entry["model"] == "pneumonia"]
        assert "children" in pneumonia["intended_population"]
        assert pneumonia["model_card"] == "docs/model_cards/pneumonia.md"
    installed = subprocess.run([str(Path(sys.executable).with_name("cxr")), "--help"], capture_output=True, text=True)
    assert installed.returncode == 0 and "predict" in installed.stdout
    missing_key = subprocess.run([str(Path(sys.executable).with_name("cxr")), "--key-file", "/nonexistent", "models"],
                                 capture_output=True, text=True)
    assert missing_key.returncode != 0 and "no key file" in missing_key.stderr


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_cli_prints_a_population_refusal(served, capsys, protocol):
    if not SHIPPED_MODEL.is_file():
        pytest.skip("the tiny test model has no population check")
    other = sorted(OTHER_SOURCES.glob("*.jpg"))[0]
    code = cli.main(["--key-file", str(served.workdir / "key_file.json"), "--port", str(served.ports["inference"]),
                     "--grpc-port", str(served.ports["grpc_inference"]), "predict", "--protocol", protocol,
                     str(other)])
    output = capsys.readouterr()
    [answer] = [json.loads(line) for line in output.out.splitlines()]
    assert code == 1 and answer["code"] == 422 and answer["error"] == "outside the model's population"
    assert answer["population"]["inside"] is False and "children" in answer["intended_population"]
    assert "outside the model's population" in output.err and "docs/model_cards/pneumonia.md" in output.err

