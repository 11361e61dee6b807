"""The hostile corpus (loadtest/hostile.py): each case gets its own 4xx within 10 s, the X-ray batched with it
is answered, no worker restarts, and peak memory grows by at most 300 MB. Through the handler here, and
through a real TorchServe (measured on the worker's VmHWM)."""

import concurrent.futures
import json
import shutil
import time

import pytest

from cxr_core.gate import GATE_FILE
from loadtest.hostile import CASES, corpus, peak_growth_mb, reset_peaks
from tests.conftest import EXAMPLE_XRAYS, REPO
from tests.handler_support import make_handler, run

MAX_SECONDS, MAX_GROWTH_MB = 10.0, 300
XRAY = EXAMPLE_XRAYS / "NORMAL" / "IM-0001-0001.jpeg"


@pytest.fixture(scope="module")
def hostile():
    return corpus()


@pytest.fixture(scope="module")
def shipped_handler(tmp_path_factory):
    """The shipped pneumonia model with its gate and population check, as its archive has them."""
    folder = tmp_path_factory.mktemp("shipped")
    shutil.copy2(REPO / "models" / "pneumonia" / "model.pt", folder / "model.pt")
    shutil.copy2(REPO / "models" / "gate" / GATE_FILE, folder / GATE_FILE)
    return make_handler(folder)


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_case_fails_alone_quickly_and_within_memory(shipped_handler, hostile, name):
    body, content_type = hostile[name]
    row = {"body": json.loads(body) if content_type == "application/json" else body}
    baselines = reset_peaks(["self"])
    started = time.monotonic()
    answers, statuses = run(shipped_handler, [row, {"body": XRAY.read_bytes()}])
    elapsed = time.monotonic() - started
    assert 400 <= statuses[0][0] < 500, (name, answers[0])
    assert 1 not in statuses and answers[1]["label"] in ("NORMAL", "PNEUMONIA"), name
    assert elapsed < MAX_SECONDS, f"{name}: {elapsed:.1f} s"
    growth = peak_growth_mb(["self"], baselines)
    assert growth <= MAX_GROWTH_MB, f"{name}: peak memory +{growth} MB"


@pytest.mark.integration
def test_the_hostile_corpus_against_a_real_torchserve(served, hostile):
    """Each case sent beside an X-ray: 4xx for it, 200 for the X-ray, same workers, bounded peak memory."""
    workers = served.worker_pids("pneumonia")
    xray = XRAY.read_bytes()
    for name, (body, content_type) in hostile.items():
        baselines = reset_peaks(workers)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            hostile_answer = pool.submit(served.predict, body, content_type=content_type)
            xray_answer = pool.submit(served.predict, xray)
            (status, answer), (xray_status, _) = hostile_answer.result(), xray_answer.result()
        elapsed = time.monotonic() - started
        assert 400 <= status < 500, (name, status, answer)
        assert xray_status == 200, name
        assert elapsed < MAX_SECONDS, f"{name}: {elapsed:.1f} s"
        assert served.worker_pids("pneumonia") == workers, f"{name}: a worker restarted"
        growth = peak_growth_mb(workers, baselines)
        assert growth <= MAX_GROWTH_MB, f"{name}: worker peak memory +{growth} MB"
