"""The demo page for clinicians and demos: upload or pick an X-ray, see the answer and where the model looked.

    python -m cxr.demo serve --port 8090             # foreground
    python -m cxr.demo start / stop --workdir logs/serve   # what `make serve` / `make stop` do

A small standard-library HTTP server on 127.0.0.1 that serves plain HTML/CSS/JS (cxr/demo_static/, no build
step) and talks to TorchServe server-side with the inference key, so no token ever reaches the browser.
POST /api/predict (image bytes, or ?sample=FOLDER/NAME) asks `/predictions/<model>` for the answer and
`/explanations/<model>_eager` for the Grad-CAM overlay, and returns both with a PNG of the image as decoded.

It holds TorchServe's inference key (never the management key), so it answers only requests that are plainly
its own page's: a loopback `Host` naming its port (a DNS-rebinding page is refused), no cross-site `Origin` or
`Sec-Fetch-Site` on a POST, a valid `Content-Length` (413 without reading an oversized body), socket timeouts
and at most MAX_CONNECTIONS connections at once (idle ones time out).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import mimetypes
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from cxr import background
from cxr.client import Client, PredictionError
from cxr.commands import command_parser
from cxr.paths import samples_dir
from cxr.server import read_key_file
from cxr_core.policy import Refusal, decode_image, lift_pillow_pixel_limit
from cxr_core.preprocessing import load_image

STATIC = Path(__file__).resolve().parent / "demo_static"
REPO = Path(__file__).resolve().parent.parent
MAX_UPLOAD = 16 * 1024 * 1024
MAX_CONNECTIONS = 256  # connection threads at once; past it a new connection is closed at once
SOCKET_TIMEOUT = 10.0  # seconds a connection may stay silent (slowloris)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
}


def preview_png(data: bytes, size: int = 512) -> str | None:
    """Base64 PNG of the image as the handler decodes it (cxr_core.policy.decode_image, DICOM included), at most
    `size` px; None if it does not decode."""
    try:
        image, _ = decode_image(data, load_image, MAX_UPLOAD)
    except Refusal:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Demo:
    """What the page needs: a TorchServe client, the model names to offer and the sample folder."""

    def __init__(self, client: Client, models: list[str], samples: Path | None) -> None:
        self.client, self.models, self.samples = client, models, samples
        # The sample folder is listed once: the page offers exactly these files and serves nothing else.
        self.sample_names = [] if samples is None or not samples.is_dir() else sorted(
            str(p.relative_to(samples)) for p in samples.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    def sample_bytes(self, name: str) -> bytes | None:
        if name not in self.sample_names:  # only listed files: no path tricks
            return None
        return (self.samples / name).read_bytes()

    def predict(self, data: bytes, model: str) -> tuple[int, dict[str, Any]]:
        if model not in self.models:
            return 400, {"error": f"unknown model {model!r}; choose one of {', '.join(self.models)}"}
        started = time.perf_counter()
        answer = self.pool.submit(self.client.predict, data, model)
        explanation = self.pool.submit(self.client.explain, data, f"{model}_eager")
        try:
            result: dict[str, Any] = {"answer": answer.result()}
        except PredictionError as error:
            status = error.status if 400 <= error.status < 500 else 502
            message = error.message if status < 500 else f"the model server did not answer: {error.message}"
            return status, {"error": message, **(error.details if status < 500 else {})}
        result["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
        try:
            result["overlay_png"] = explanation.result()["overlay_png"]
        except PredictionError as error:
            result["overlay_png"], result["explain_error"] = None, f"no heatmap: {error.message}"
        result["original_png"] = preview_png(data)
        return 200, result


class Handler(BaseHTTPRequestHandler):
    demo: Demo  # set on the class by make_server
    port: int  # likewise: the port the page is served on, the only one a Host header may name
    server_version = "cxr-demo"
    sys_version = ""
    timeout = SOCKET_TIMEOUT

    def _refusal(self, post: bool) -> tuple[int, str] | None:
        """Why this request is not from our own page, or None."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in {f"{name}:{self.port}" for name in LOOPBACK_HOSTS}:
            return 421, f"unexpected Host {host!r}: open the page as http://127.0.0.1:{self.port}/"
        if post:
            origin = self.headers.get("Origin")
            if origin is not None and origin.lower() != f"http://{host}":
                return 403, "cross-site request refused"
            if self.headers.get("Sec-Fetch-Site", "same-origin").lower() not in ("same-origin", "none"):
                return 403, "cross-site request refused"
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        refused = self._refusal(post=False)
        if refused:
            return self._json(refused[0], {"error": refused[1]})
        url = urlparse(self.path)
        if url.path in ("/", "/index.html"):
            return self._send(200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
        if url.path.startswith("/static/"):
            name = url.path.removeprefix("/static/")
            path = STATIC / name
            if "/" in name or not path.is_file():
                return self._json(404, {"error": "not found"})
            return self._send(200, path.read_bytes(), mimetypes.guess_type(name)[0] or "application/octet-stream")
        if url.path == "/api/config":
            return self._json(200, {"models": self.demo.models, "samples": self.demo.sample_names})
        if url.path == "/api/health":
            try:
                return self._json(200, {"torchserve": self.demo.client.ping()})
            except PredictionError as error:
                return self._json(502, {"error": f"the model server is not reachable: {error.message}"})
        return self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        self.close_connection = True  # a refused body is never read: the connection cannot be reused
        refused = self._refusal(post=True)
        if refused:
            return self._json(refused[0], {"error": refused[1]})
        url = urlparse(self.path)
        if url.path != "/api/predict":
            return self._json(404, {"error": "not found"})
        query = parse_qs(url.query)
        model = query.get("model", [self.demo.models[0]])[0]
        declared = self.headers.get("Content-Length")
        if declared is None:
            return self._json(411, {"error": "Content-Length is required"})
        if not declared.strip().isdigit():
            return self._json(400, {"error": f"bad Content-Length {declared!r}"})
        length = int(declared)
        if length > MAX_UPLOAD:
            return self._json(413, {"error": f"file of {length} bytes is over the {MAX_UPLOAD} byte limit"})
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            return self._json(400, {"error": f"the body ended after {len(data)} of {length} bytes"})
        if "sample" in query:
            data = self.demo.sample_bytes(query["sample"][0]) or b""
            if not data:
                return self._json(404, {"error": f"no sample named {query['sample'][0]!r}"})
        if not data:
            return self._json(400, {"error": "no file was sent: choose or drop an X-ray image"})
        status, payload = self.demo.predict(data, model)
        return self._json(status, payload)


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them: past that a new connection is closed at once
    rather than queued behind idle ones."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (socketserver's default of 5 stalls bursts of connections)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(port: int, demo: Demo) -> ThreadingHTTPServer:
    lift_pillow_pixel_limit()  # previews decode as the handler does
    server = BoundedServer(("127.0.0.1", port), Handler)
    server.RequestHandlerClass = type("BoundHandler", (Handler,), {"demo": demo, "port": server.server_port})
    return server


def _serve(args: argparse.Namespace) -> None:
    inference_key = read_key_file(args.key_file)["inference"]  # the management key is never loaded here
    client = Client({"inference": inference_key}, ports={"inference": args.inference_port}, timeout=60, retries=1)
    samples = Path(args.samples) if args.samples else None
    server = make_server(args.port, Demo(client, args.models, samples))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `stop`: leave serve_forever, close the socket
    print(f"demo page on http://127.0.0.1:{args.port}/", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()


def start(args: argparse.Namespace) -> None:
    """Run `serve` in the background (cxr.background), pid file and log in --workdir."""
    command = [sys.executable, "-m", "cxr.demo", "serve", "--port", str(args.port), "--key-file", args.key_file,
               "--inference-port", str(args.inference_port), "--samples", args.samples or "", "--models",
               *args.models]
    background.start(command, Path(args.workdir), "demo", args.port)
    print(f"demo page: http://127.0.0.1:{args.port}/ (talks to TorchServe server-side; no token in the browser)")


def stop(args: argparse.Namespace) -> None:
    background.stop(Path(args.workdir), "demo")


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("action", choices=["serve", "start", "stop"])
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--workdir", default="logs/serve", help="where TorchServe's key file and our pid file live")
    parser.add_argument("--key-file", default=None, help="default: <workdir>/key_file.json")
    parser.add_argument("--inference-port", type=int, default=8080)
    parser.add_argument("--models", nargs="+", default=["pneumonia"])
    parser.add_argument("--samples", default=str(samples_dir()))
    args = parser.parse_args()
    args.key_file = args.key_file or str(Path(args.workdir).resolve() / "key_file.json")
    {"serve": _serve, "start": start, "stop": stop}[args.action](args)


if __name__ == "__main__":
    main()
