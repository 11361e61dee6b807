"""The demo page's server against requests that are not from its own page: DNS rebinding (a foreign Host),
cross-site POSTs, lying Content-Lengths, idle connections. No TorchServe or browser needed."""

import http.client
import socket
import threading
import time

import pytest

from cxr.client import PredictionError
from cxr.demo import MAX_UPLOAD, Demo, make_server
from cxr.server import free_ports


class AnsweringClient:
    def predict(self, data, model):
        return {"model": model, "label": "NORMAL", "probabilities": {"NORMAL": 1.0}}

    def explain(self, data, model):
        raise PredictionError(501, "does not explain")

    def ping(self):
        return "Healthy"


@pytest.fixture()
def page():
    [port] = free_ports(1)
    server = make_server(port, Demo(AnsweringClient(), ["pneumonia"], None))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    server.shutdown()
    server.server_close()


def raw(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send `request` as it is; the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def post(port: int, headers: dict[str, str], body: bytes = b"x") -> tuple[int, bytes]:
    lines = ["POST /api/predict HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def test_our_own_page_is_answered(page):
    connection = http.client.HTTPConnection("127.0.0.1", page, timeout=5)
    connection.request("POST", "/api/predict", body=b"image", headers={"Origin": f"http://127.0.0.1:{page}"})
    assert connection.getresponse().status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "127.0.0.1.nip.io:{port}"])
def test_a_foreign_host_is_refused(page, host):
    status, body = raw(page, f"GET /api/config HTTP/1.1\r\nHost: {host.format(port=page)}\r\n\r\n".encode())
    assert status == 421 and b"unexpected Host" in body


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "null", "Content-Type": "text/plain"}])
def test_a_cross_site_post_is_refused(page, headers):
    status, body = post(page, {"Host": f"127.0.0.1:{page}", "Content-Length": "1", **headers})
    assert status == 403 and b"cross-site" in body


@pytest.mark.parametrize("length, status", [("-1", 400), ("abc", 400), (None, 411), (str(MAX_UPLOAD + 1), 413)])
def test_a_bad_content_length_is_answered_at_once(page, length, status):
    headers = {"Host": f"127.0.0.1:{page}"} | ({"Content-Length": length} if length else {})
    started = time.monotonic()
    answer, _ = post(page, headers, b"")  # no body follows: the server must not wait for one
    assert answer == status and time.monotonic() - started < 2


def test_idle_connections_do_not_stop_a_normal_request(page):
    idle = [socket.create_connection(("127.0.0.1", page), timeout=5) for _ in range(200)]
    try:
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", page, timeout=5)
        connection.request("GET", "/api/config")
        assert connection.getresponse().status == 200 and time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()


def test_the_page_loads_only_the_inference_key(tmp_path, monkeypatch):
    """`serve` builds its client from the inference key alone."""
    import json

    from cxr import demo

    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "i"}, "management": {"key": "m"}}))
    seen = {}

    class Stop(Exception):
        pass

    def fake_server(port, page_demo):
        seen["keys"] = page_demo.client.keys
        raise Stop

    monkeypatch.setattr(demo, "make_server", fake_server)
    args = type("Args", (), {"key_file": str(tmp_path / "key_file.json"), "inference_port": 1, "samples": "",
                             "port": 1, "models": ["pneumonia"]})()
    with pytest.raises(Stop):
        demo._serve(args)
    assert seen["keys"] == {"inference": "i"}
