"""The container image for real (`make test-image` builds it first): started with `scripts/image.sh up` on
127.0.0.1:18080-18082, it runs as non-root on a read-only root file system, keeps its key file in logs/image/,
answers the example X-rays as the real TorchServe of the other tests does, and `down` frees its ports.
Skipped, saying why, where no container engine or no built image is at hand (CI: the build takes minutes)."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from cxr.server import read_key_file
from tests.conftest import EXAMPLE_XRAYS, REPO
from tests.handler_support import assert_same_answer

pytestmark = [pytest.mark.image, pytest.mark.integration]
IMAGE = "localhost/cxr-serve:latest"
PORTS = {"inference": 18080, "management": 18081, "metrics": 18082}
SCRIPT = REPO / "scripts" / "image.sh"
KEY_FILE = REPO / "logs" / "image" / "key_file.json"


def engine(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    command = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"] if shutil.which("podman") else ["docker"]
    environment = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                                   str(REPO / "docker" / "containers.conf"))}
    return subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=300, check=check,
                          env=environment)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(command: str) -> dict[str, str]:
    """`scripts/image.sh up` or `compose-up`, which return once TorchServe answers with the keys it printed; then
    those keys, read once, as a user copies them: no retrying until they work."""
    started = subprocess.run([str(SCRIPT), command], check=True, timeout=600, stdout=subprocess.PIPE, text=True)
    keys = read_key_file(KEY_FILE)
    assert f"inference key: {keys['inference']}" in started.stdout
    return keys


def need_image() -> None:
    if not (shutil.which("podman") or shutil.which("docker")):
        pytest.skip("no container engine (podman or docker): `make test-image` installs podman and builds the image")
    if engine("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.skip(f"image {IMAGE} is not built: `make test-image` builds it (minutes) and runs this test")
    busy = [port for port in [*PORTS.values(), 19090] if port_open(port)]
    if busy:
        pytest.skip(f"ports {busy} are in use (`make image-down` / `make compose-down` stop a running image)")


@pytest.fixture(scope="module")
def image_server():
    need_image()
    try:
        yield start("up")
    finally:
        subprocess.run([str(SCRIPT), "down"], timeout=120)


def predict(keys: dict[str, str], data: bytes, model: str = "pneumonia") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{PORTS['inference']}/predictions/{model}", data=data,
                                     headers={"Authorization": f"Bearer {keys['inference']}",
                                              "Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_image_answers_like_make_serve_as_non_root_on_a_read_only_root(image_server, served):
    keys = image_server
    for path in sorted(EXAMPLE_XRAYS.rglob("*.jpeg")):
        status, answer = predict(keys, path.read_bytes())
        assert status == 200, answer
        _, reference = served.predict(path.read_bytes())
        assert_same_answer(answer, reference)
    assert engine("exec", "cxr-serve-image", "id", "-u").stdout.strip() == "10001"
    assert engine("exec", "cxr-serve-image", "touch", "/home/model-server/x", check=False).returncode != 0
    inspected = json.loads(engine("inspect", "cxr-serve-image").stdout)[0]
    assert inspected["HostConfig"]["ReadonlyRootfs"] is True
    assert (KEY_FILE.parent.stat().st_mode & 0o077) == 0  # the key folder is the image user's alone


def test_down_frees_the_ports(image_server):
    subprocess.run([str(SCRIPT), "down"], check=True, timeout=120)
    assert not any(port_open(port) for port in PORTS.values())


def test_compose_serves_with_prometheus_scraping(served):
    """docker-compose.host.yml for real: the image and a Prometheus built from Debian's package; a CxrPredictions
    series is read back from Prometheus's HTTP API after a few predictions."""
    need_image()
    if shutil.which("podman") and not (REPO / ".venv" / "bin" / "podman-compose").exists():
        pytest.skip("podman-compose is not installed (make setup installs the pinned one)")
    try:
        keys = start("compose-up")
        for path in sorted(EXAMPLE_XRAYS.rglob("*.jpeg"))[:3]:
            assert predict(keys, path.read_bytes())[0] == 200
        # The worker's counts reach the metrics port, and then a scrape, a little later: poll until all three
        # predictions are in (or two minutes have passed), not only until a first series appears.
        deadline, series = time.monotonic() + 120, []
        while sum(float(entry["value"][1]) for entry in series) < 3 and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:19090/api/v1/query?query=CxrPredictions",
                                            timeout=5) as response:
                    series = json.loads(response.read())["data"]["result"]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(2)
        assert series and {entry["metric"].get("Label") for entry in series} <= {"NORMAL", "PNEUMONIA"}
        assert sum(float(entry["value"][1]) for entry in series) >= 3
    finally:
        subprocess.run([str(SCRIPT), "compose-down"], timeout=300)
