"""The client's retries without TorchServe: transient failures (connection refused, 503) are retried with
back-off and then reported; a refusal (4xx) is reported at once."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cxr import client as client_module
from cxr.client import Client, PredictionError
from cxr.server import free_ports


@pytest.fixture
def sleeps(monkeypatch):
    recorded = []
    monkeypatch.setattr(client_module.time, "sleep", recorded.append)
    return recorded


def serve(statuses):
    """A loopback server answering /predictions/x with the given statuses in turn; returns (port, hits)."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = statuses[min(len(hits), len(statuses) - 1)]
            hits.append(status)
            body = json.dumps({"label": "NORMAL"} if status == 200 else {"code": status, "error": f"e{status}"})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hits


def test_unreachable_server_is_retried_then_reported(sleeps):
    [port] = free_ports(1)
    client = Client({"inference": "k", "management": "k"}, ports={"inference": port}, retries=2, timeout=2)
    with pytest.raises(PredictionError) as failed:
        client.predict(b"x")
    assert failed.value.status == 503 and "cannot reach" in failed.value.message
    assert sleeps == [0.5, 1.0]


def test_503_is_retried_until_an_answer(sleeps):
    server, hits = serve([503, 503, 200])
    try:
        client = Client({"inference": "k", "management": "k"}, ports={"inference": server.server_port}, retries=2)
        assert client.predict(b"x") == {"label": "NORMAL"}
        assert hits == [503, 503, 200] and sleeps == [0.5, 1.0]
    finally:
        server.shutdown()


def test_a_refusal_is_not_retried(sleeps):
    server, hits = serve([400])
    try:
        client = Client({"inference": "k", "management": "k"}, ports={"inference": server.server_port}, retries=3)
        with pytest.raises(PredictionError) as refused:
            client.predict(b"x")
        assert (refused.value.status, refused.value.message) == (400, "e400")
        assert hits == [400] and sleeps == []
    finally:
        server.shutdown()
