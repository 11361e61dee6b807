"""Integration: what an operator does to the session's real TorchServe: swap versions under load, scale
workers, describe a model, register a new variant's archive."""

import json
import threading
import time
from collections import Counter

import pytest

from tests.conftest import SHIPPED_MODEL
from tests.handler_support import assert_same_answer
from tests.serving_support import run_cli

pytestmark = pytest.mark.integration


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


def test_an_aotinductor_archive_registers_and_agrees_with_eager(served, sample_paths, tmp_path):
    """torch.export + AOTInductor (the variant that replaces TorchScript): exported and checked by
    `python -m export`, archived, registered through the management API, same answers as the eager archive."""
    from cxr import server
    from cxr.paths import data_root
    from export import __main__ as export_cli
    from tests.serving_support import StillRunning, archive, register, slow_machine_config

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
