"""Integration: a real TorchServe on loopback serving archives built from the shipped model."""

import base64
import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from cxr import cli
from cxr.client import Client as CxrClient
from cxr.client import PredictionError
from tests.conftest import SHIPPED_MODEL
from tests.handler_support import assert_same_answer
from tests.test_population import OTHER_SOURCES

pytestmark = pytest.mark.integration


def test_token_is_required(served):
    status, body = served.request("/ping", key=None)
    assert status == 400 and body["type"] == "InvalidKeyException"
    assert served.request("/ping", key="wrong-key")[0] == 400
    status, body = served.request("/ping")
    assert status == 200 and body["status"] == "Healthy"
    assert served.predict(b"x", key=None)[0] == 400


def test_every_sample_xray_gets_an_answer(served, sample_paths):
    correct = 0
    for path in sample_paths:
        status, answer = served.predict(path.read_bytes())
        assert status == 200, (path, answer)
        assert set(answer) == {"model", "version", "label", "probabilities", "threshold", "gate", "population"}
        assert answer["model"] == "pneumonia" and answer["version"] == "1.0"
        assert answer["gate"]["ran"] and answer["gate"]["score"] <= answer["gate"]["limit"]
        if SHIPPED_MODEL.is_file():
            assert answer["population"]["inside"] is True and answer["population"]["check"] == "logistic"
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        correct += answer["label"] == path.parent.name
    if SHIPPED_MODEL.is_file():
        assert correct / len(sample_paths) >= 0.8, f"{correct}/{len(sample_paths)} sample X-rays right"


def test_cxr4_answers_beside_pneumonia_with_four_probabilities(served, sample_paths):
    from tests.serving_support import SHIPPED_CXR4

    if not SHIPPED_CXR4.is_file():
        pytest.skip(f"no 4-class model at {SHIPPED_CXR4}")
    labels = Counter()
    for path in sample_paths[::4]:
        status, answer = served.predict(path.read_bytes(), model="cxr4")
        assert status == 200, answer
        assert set(answer) == {"model", "version", "label", "probabilities", "threshold", "gate", "population"}
        assert answer["model"] == "cxr4" and answer["threshold"] is None
        assert set(answer["probabilities"]) == {"NORMAL", "PNEUMONIA", "TUBERCULOSIS", "COVID19"}
        assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
        labels[answer["label"]] += 1
        assert served.predict(path.read_bytes())[1]["model"] == "pneumonia"  # the other model, same server
    assert labels["PNEUMONIA"] > 0


def test_an_other_source_xray_is_refused_beside_a_kermany_one(served, sample_paths):
    """A TBX11K film (adult, another source) and a Kermany film sent together: 422 naming the population for
    the first, 200 for the second."""
    if not SHIPPED_MODEL.is_file():
        pytest.skip("the tiny test model has no population check")
    other = sorted(OTHER_SOURCES.glob("*.jpg"))
    jobs = [other[0].read_bytes(), sample_paths[0].read_bytes(), other[1].read_bytes()]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        (s0, a0), (s1, a1), (s2, a2) = pool.map(served.predict, jobs)
    for status, body in ((s0, a0), (s2, a2)):
        assert status == 422, body
        assert body["error"] == "outside the model's population" and body["population"]["inside"] is False
        assert "children" in body["intended_population"] and body["model_card"] == "docs/model_cards/pneumonia.md"
    assert s1 == 200 and a1["population"]["inside"] is True
    status, body = served.predict(other[0].read_bytes(), model="pneumonia_eager")  # every backend checks
    assert status == 422 and body["error"] == "outside the model's population"


def test_onnx_and_eager_archives_agree(served, sample_paths):
    for path in sample_paths[::8]:
        _, onnx_answer = served.predict(path.read_bytes())
        _, eager_answer = served.predict(path.read_bytes(), model="pneumonia_eager")
        assert_same_answer({**onnx_answer, "model": "pneumonia_eager"}, eager_answer)


def test_request_shapes(served, sample_paths):
    data = sample_paths[0].read_bytes()
    _, raw = served.predict(data)
    encoded = base64.b64encode(data).decode()
    status, listed = served.predict(json.dumps({"instances": [encoded, encoded]}).encode(),
                                    content_type="application/json")
    assert status == 200 and len(listed) == 2
    for answer in listed:
        assert_same_answer(answer, raw)
    boundary = "cxrboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.jpeg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, answer = served.predict(multipart, content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200
    assert_same_answer(answer, raw)


def test_bad_inputs_fail_alone_and_the_worker_survives(served, sample_paths):
    pids_before = served.worker_pids("pneumonia")
    good = [path.read_bytes() for path in sample_paths[:8]]
    bad = [b"", b"not an image", good[0][: len(good[0]) // 3], b"GIF89a" + b"\0" * 50]
    jobs = [(data, True) for data in good] + [(data, False) for data in bad]
    jobs = jobs * 3
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda job: (job, served.predict(job[0])), jobs))
    for (_, is_good), (status, body) in results:
        if is_good:
            assert status == 200 and body["label"] in ("NORMAL", "PNEUMONIA")
        else:
            assert 400 <= status < 500, body
            assert body["error"] and body["code"] == status
    assert len(results) == len(jobs)  # nothing lost
    assert served.worker_pids("pneumonia") == pids_before  # no worker died or restarted


def test_a_photograph_is_refused_as_not_a_chest_xray(served, sample_paths):
    """The gate inside the archive: a photo gets a 422 naming the problem, while an X-ray sent at the same
    time (same dynamic batch, most likely) is answered."""
    from tests.handler_support import encode
    from training.not_xrays import bundled_images

    photo = next(image for source, _, image in bundled_images() if source == "skimage/coffee")
    jobs = [encode(photo.convert("RGB"), "JPEG"), sample_paths[0].read_bytes()] * 4
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(served.predict, jobs))
    for index, (status, body) in enumerate(results):
        if index % 2 == 0:
            assert status == 422 and body["error"] == "not a chest X-ray", body
            assert body["gate_score"] > body["gate_limit"]
        else:
            assert status == 200 and body["gate"]["ran"], body


def test_binary_sent_as_form_data_is_refused(served, sample_paths):
    """What `curl --data-binary` without a Content-Type does. When TorchServe's frontend can URL-decode the
    bytes, our handler answers 415 naming the problem; when it cannot (a '%' not followed by hex), the
    frontend itself answers 500 before any handler runs, which we cannot change (documented in the README)."""
    for path in sample_paths[:6]:
        status, body = served.predict(path.read_bytes(), content_type="application/x-www-form-urlencoded")
        if status == 500:
            assert body["type"] == "ErrorDataDecoderException", body
        else:
            assert status == 415 and "form data" in body["error"], body
    assert served.predict(sample_paths[0].read_bytes())[0] == 200  # the same bytes, labelled right


def test_oversized_body_is_refused_by_the_frontend(served):
    """A body over max_request_size (16 MiB) is refused from its Content-Length, before it is read."""
    with socket.create_connection(("127.0.0.1", served.ports["inference"]), timeout=30) as sock:
        sock.sendall((f"POST /predictions/pneumonia HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {served.keys['inference']}\r\nContent-Type: image/jpeg\r\n"
                      f"Content-Length: {17 * 1024 * 1024}\r\n\r\n").encode() + b"\xff" * 1024)
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert b" 413 " in status_line + b" ", status_line


def test_remote_archive_urls_are_refused(served):
    status, body = served.request("/models?url=http://127.0.0.1:9/evil.mar&initial_workers=1", body=b"",
                                  key="management", api="management", method="POST")
    assert 400 <= status < 500 and "evil" in json.dumps(body), body


def test_explanations_over_rest(served, sample_paths):
    data = sample_paths[-1].read_bytes()
    status, explained = served.request("/explanations/pneumonia_eager", data)
    assert status == 200 and explained["label"] in ("NORMAL", "PNEUMONIA")
    assert len(explained["heatmap"]) == len(explained["heatmap"][0]) > 0 and explained["overlay_png"]
    status, refused = served.request("/explanations/pneumonia", data)
    assert status == 501 and "does not explain" in refused["error"]


def test_cli_explain_writes_the_overlay(served, capsys, sample_paths, tmp_path):
    out = tmp_path / "heatmap.png"
    code, [answer] = run_cli(served, capsys, "explain", str(sample_paths[-1]), "--out", str(out))
    assert code == 0 and answer["overlay"] == str(out) and answer["label"] in ("NORMAL", "PNEUMONIA")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _ = run_cli(served, capsys, "explain", str(sample_paths[-1]), "--out", str(out), "--model", "pneumonia")
    assert code == 1  # the ONNX archive does not explain


def test_management_api_needs_its_own_key(served):
    assert served.request("/models", key="inference", api="management")[0] == 400
    status, body = served.request("/models", key="management", api="management")
    assert status == 200 and {m["modelName"] for m in body["models"]} >= {"pneumonia", "pneumonia_eager"}
    assert {m["modelName"] for m in body["models"]} <= {"pneumonia", "pneumonia_eager", "cxr4"}


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


def run_cli(served, capsys, *arguments):
    options = ["--key-file", str(served.workdir / "key_file.json"), "--port", str(served.ports["inference"]),
               "--grpc-port", str(served.ports["grpc_inference"]),
               "--management-port", str(served.ports["management"])]
    code = cli.main([*options, *arguments])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


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

    from cxr.preprocessing import load_image
    from tests.test_dicom import make_dicom

    pixels = np.asarray(load_image(sample_paths[0]))
    dicom = tmp_path / "xray.dcm"
    dicom.write_bytes(make_dicom(pixels.astype(np.uint16) * 16, bits=12))
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


def test_prometheus_metrics_count_labels_and_rejections(served, sample_paths):
    served.predict(sample_paths[0].read_bytes())
    served.predict(b"")
    with urllib.request.urlopen(f"http://127.0.0.1:{served.ports['metrics']}/metrics", timeout=30) as response:
        text = response.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("Cxr")]
    assert any(line.startswith("CxrPredictions{") and 'ModelName="pneumonia"' in line for line in lines), lines
    assert any(line.startswith("CxrRejected{") and 'Reason="empty"' in line for line in lines), lines
    assert any(line.startswith("CxrInferenceTime{") for line in lines)
    assert "ts_inference_requests_total" in text


def test_swap_under_load_loses_no_request(served, capsys, sample_paths, tmp_path):
    """A bounded load (4 client threads, at most 60 s and 4,000 requests) runs through a deploy of version
    2.0 and a rollback to 1.0; every request must be answered 200."""
    payloads = [path.read_bytes() for path in sample_paths[:8]]
    stop, lock = threading.Event(), threading.Lock()
    versions, failures, sent = Counter(), [], [0]

    def load(offset: int) -> None:
        deadline, index = time.monotonic() + 60, offset
        while not stop.is_set() and time.monotonic() < deadline and sent[0] < 4000:
            try:
                status, body = served.predict(payloads[index % len(payloads)])
            except OSError as error:  # a timeout or a reset is a lost request
                status, body = 0, str(error)
            index += 1
            with lock:
                sent[0] += 1
                if status == 200:
                    versions[body["version"]] += 1
                else:
                    failures.append((status, body))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        options = ["--samples", str(sample_paths[0].parent.parent), "--history", str(tmp_path / "history.json")]
        code, [deployed] = run_cli(served, capsys, "deploy", "pneumonia-2.0.mar", *options)
        assert code == 0 and (deployed["old_version"], deployed["new_version"]) == ("1.0", "2.0")
        time.sleep(1.5)
        code, [rolled_back] = run_cli(served, capsys, "rollback", *options)
        assert code == 0 and (rolled_back["old_version"], rolled_back["new_version"]) == ("2.0", "1.0")
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    print(f"swap under load: {sent[0]} requests, {len(failures)} failed, answered by {dict(versions)}")
    assert failures == []
    assert versions["1.0"] > 0 and versions["2.0"] > 0 and sum(versions.values()) == sent[0]
    assert [e["modelVersion"] for e in served.request("/models/pneumonia/all", key="management",
                                                      api="management")[1]] == ["1.0"]


def test_scale_workers_up_and_down(served, capsys):
    for workers in (2, 1):
        code, _ = run_cli(served, capsys, "scale", str(workers), "--model", "pneumonia_eager")
        assert code == 0
        assert len(served.worker_pids("pneumonia_eager")) == workers


def test_customized_describe_gives_the_model_config(served):
    """`?customized=true` runs the handler's describe_handle: classes, threshold and preprocessing of the model."""
    status, body = served.request("/models/pneumonia?customized=true", key="management", api="management")
    assert status == 200, body
    assert "class_names" in json.dumps(body) and "PNEUMONIA" in json.dumps(body), body
    if SHIPPED_MODEL.is_file():
        custom = body[0]["customizedMetadata"]  # TorchServe 0.12 gives the handler's dict as it is
        custom = json.loads(custom) if isinstance(custom, str) else custom
        assert custom["population_check"] == "refuse" and "children" in custom["intended_population"]
        assert custom["model_card"] == "docs/model_cards/pneumonia.md"


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


def test_keys_are_private_and_logs_stay_small(served, sample_paths):
    """The key folder is 0700 from before TorchServe starts; an answered request adds < 1 KB of logs (TorchServe's
    own defaults: ~3.7 KB, DEBUG and an unrotated stdout)."""
    assert served.workdir.stat().st_mode & 0o077 == 0
    files = [*(served.workdir / "logs").glob("*.log"), served.workdir / "torchserve.out"]

    def logged() -> int:
        return sum(path.stat().st_size for path in files if path.is_file())

    before = logged()
    for path in sample_paths[:10] * 4:
        assert served.predict(path.read_bytes())[0] == 200
    time.sleep(1)  # log4j2 writes asynchronously to the rolling files
    per_request = (logged() - before) / 40
    print(f"logs: {per_request:.0f} bytes per answered request")
    assert per_request < 1024, f"{per_request:.0f} bytes of logs per answered request"


def test_an_aotinductor_archive_registers_and_agrees_with_eager(served, sample_paths, tmp_path):
    """torch.export + AOTInductor (the variant that replaces TorchScript): exported and checked by
    `python -m export`, archived, registered through the management API, same answers as the eager archive."""
    from cxr import server
    from cxr.paths import data_root
    from export import __main__ as export_cli
    from tests.serving_support import archive, register, slow_machine_config

    export_dir = tmp_path / "export"
    export_cli.main(export_cli.get_args_parser().parse_args(
        ["--checkpoint", str(served.export_dir / "model.pt"), "--output-dir", str(export_dir), "--formats", "aoti",
         "--check-images", "16", "--repeats", "1", "--data", str(data_root() / "pneumonia")]))
    archive(export_dir, served.store, slow_machine_config(tmp_path / "model-config.yaml"), "--name", "aotitest",
            "--variants", "aoti", "--default", "aoti", "--version", "1.0")
    register(served.ports, served.keys, "aotitest_aoti", "aotitest_aoti.mar")
    try:
        server.wait_ready(served.workdir, served.ports["management"], ["aotitest_aoti"], StillRunning(), 900)
        for path in sample_paths:
            status, answer = served.predict(path.read_bytes(), model="aotitest_aoti")
            _, eager = served.predict(path.read_bytes(), model="pneumonia_eager")
            assert status == 200, answer
            assert_same_answer({**answer, "model": "pneumonia_eager"}, eager)
    finally:
        served.request("/models/aotitest_aoti/1.0", key="management", api="management", method="DELETE")


class StillRunning:
    """wait_ready watches a process; the session's TorchServe is the fixture's."""

    returncode = None

    def poll(self):
        return None
