"""Start and stop a TorchServe instance on loopback, for `make serve`, the tests and the benchmarks.

TorchServe runs in the foreground of its own process group (so several instances, each with its own ports
and working folder, can coexist), writes its logs and `key_file.json` (the token keys) into `workdir`.

    python -m cxr.server start --workdir logs/serve --models pneumonia=pneumonia.mar
    python -m cxr.server stop --workdir logs/serve
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cxr.commands import command_parser

REPO = Path(__file__).resolve().parent.parent
LOG_CONFIG = REPO / "log4j2.xml"  # INFO, no per-request lines, every file rolled at 10 MB
LOG_BYTES = 10 * 1024 * 1024
DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082, "grpc_inference": 7070,
                 "grpc_management": 7071}


def free_ports(count: int) -> list[int]:
    """`count` loopback ports that were free a moment ago (for tests and benchmarks)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def write_config(path: Path, model_store: Path, ports: dict[str, int] | None = None,
                 overrides: dict[str, str] | None = None) -> Path:
    """The shipped config.properties with the ports, model store and any overrides replaced."""
    ports = {**DEFAULT_PORTS, **(ports or {})}
    values = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store.resolve()),
        "allowed_urls": f"file://{model_store.resolve()}/.*\\\\.mar",
        **(overrides or {}),
    }
    lines, seen = [], set()
    for line in (REPO / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.startswith("#") and "=" in line and key in values:
            line, _ = f"{key}={values[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{key}={value}" for key, value in values.items() if key not in seen]
    path.write_text("\n".join(lines) + "\n")
    return path


class KeyFileError(ValueError):
    """The key file is missing or not the JSON TorchServe writes; the message names the file."""


def read_key_file(path: str | os.PathLike) -> dict[str, str]:
    """{"inference": ..., "management": ...} from a key_file.json that TorchServe wrote."""
    path = Path(path)
    try:
        keys = json.loads(path.read_text())
        return {"inference": keys["inference"]["key"], "management": keys["management"]["key"]}
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path} (start the server with `make serve`, or pass --key-file)") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KeyFileError(f"{path} is not a TorchServe key file ({type(error).__name__}: {error}); "
                           "`make serve` writes a new one") from None


def read_keys(workdir: Path) -> dict[str, str]:
    """The keys of the TorchServe running from `workdir`."""
    return read_key_file(workdir / "key_file.json")


def java_major(java: str) -> int:
    """17 for a Java 17 binary, 0 when it does not run."""
    try:
        banner = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return 0
    found = re.search(r'version "(\d+)', banner)
    return int(found.group(1)) if found else 0


def with_java(environment: dict[str, str]) -> dict[str, str]:
    """TorchServe's launcher runs $JAVA_HOME/bin/java, else `java` on the PATH; make that a Java >= 17, taking an
    installed JDK 17+ when an older one comes first."""
    home = environment.get("JAVA_HOME")
    if java_major(f"{home}/bin/java" if home else "java") >= 17:
        return environment
    for candidate in sorted(glob.glob("/usr/lib/jvm/*/bin/java")):
        if java_major(candidate) >= 17:
            return {**environment, "JAVA_HOME": str(Path(candidate).parent.parent)}
    raise RuntimeError("TorchServe needs Java >= 17 and none was found: run `make java`, or set JAVA_HOME")


def start(workdir: Path, models: dict[str, str], *, model_store: Path = REPO / "model_store",
          ports: dict[str, int] | None = None, overrides: dict[str, str] | None = None,
          timeout: float = 180.0) -> subprocess.Popen:
    """Start TorchServe and wait until every model answers /ping-and-describe as ready."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # TorchServe writes its keys into the working folder before it makes the file 0600: a folder only its owner
    # may enter keeps them private from the first byte.
    workdir.chmod(0o700)
    (workdir / "key_file.json").unlink(missing_ok=True)
    config = write_config(workdir / "config.properties", model_store, ports, overrides)
    torchserve = Path(sys.executable).with_name("torchserve")
    # TorchServe's launcher refuses to start while $TMPDIR/.model_server.pid names a live instance: a TMPDIR
    # per working folder lets `make serve` and the tests' servers run side by side.
    (workdir / "tmp").mkdir(exist_ok=True)
    environment = {**os.environ, "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs"),
                   "PYTHONPATH": "", "TMPDIR": str(workdir / "tmp")}
    environment["PATH"] = f"{torchserve.parent}{os.pathsep}{environment.get('PATH', '')}"
    environment = with_java(environment)
    command = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--log-config", str(LOG_CONFIG),
               "--model-store", str(model_store.resolve()),
               *(["--models", *[f"{name}={archive}" for name, archive in models.items()]] if models else [])]
    captured = workdir / "torchserve.out"  # the launcher's stdout: errors only (log4j2.xml), kept to 2 x 10 MB
    if captured.is_file() and captured.stat().st_size > LOG_BYTES:
        captured.replace(captured.with_name("torchserve.out.1"))
    with open(captured, "ab") as output:
        process = subprocess.Popen(command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
    (workdir / "torchserve.pid").write_text(str(process.pid))
    port = {**DEFAULT_PORTS, **(ports or {})}["management"]
    try:
        wait_ready(workdir, port, list(models), process, timeout)
    except BaseException:
        stop_process(process)
        raise
    return process


def wait_ready(workdir: Path, management_port: int, names: list[str], process: subprocess.Popen,
               timeout: float) -> None:
    """Until the management API answers (with the key TorchServe wrote) and every named model's workers are
    READY."""
    deadline = time.monotonic() + timeout
    pending = [""] + list(names)  # "": the model list itself, i.e. the frontend is up
    while pending:
        if process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with {process.returncode}; see {workdir / 'torchserve.out'}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"models {pending} not ready after {timeout:.0f} s; see {workdir / 'logs'}")
        if (workdir / "key_file.json").is_file():
            path = f"/models/{pending[0]}" if pending[0] else "/models"
            try:
                # Inside the try: TorchServe may still be writing the key file (KeyFileError until it is whole).
                key = read_keys(workdir)["management"]
                request = urllib.request.Request(f"http://127.0.0.1:{management_port}{path}",
                                                 headers={"Authorization": f"Bearer {key}"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = json.loads(response.read())
                workers = answer[0].get("workers", []) if pending[0] else [{"status": "READY"}]
                if workers and all(worker.get("status") == "READY" for worker in workers):
                    pending.pop(0)
                    continue
            except (urllib.error.URLError, OSError, ValueError, IndexError, KeyError):
                pass
        time.sleep(0.5)


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop TorchServe's whole process group (launcher, Java frontend and Python workers)."""
    _stop_group(process.pid, timeout, reap=process.poll)
    process.wait()


def _group_alive(pgid: int, reap: Callable[[], object] | None = None) -> bool:
    if reap is not None:
        reap()  # a zombie launcher would otherwise keep the group "alive"
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(pgid: int, timeout: float, reap: Callable[[], object] | None = None) -> bool:
    """SIGTERM the group, SIGKILL what is left after `timeout`; returns once every member is gone."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _group_alive(pgid, reap) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid, reap):
        os.killpg(pgid, signal.SIGKILL)
        while _group_alive(pgid, reap):
            time.sleep(0.1)
    return True


def stop(workdir: Path) -> bool:
    """Stop the instance whose pid file is in `workdir`; False if none was running."""
    pid_file = workdir / "torchserve.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    pid_file.unlink()
    return _stop_group(pid, timeout=30.0)


def main() -> None:
    parser = command_parser(__doc__)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--workdir", default="logs/serve", type=Path)
    parser.add_argument("--model-store", default=REPO / "model_store", type=Path)
    parser.add_argument("--models", nargs="*", default=["pneumonia=pneumonia.mar"], help="NAME=ARCHIVE.mar")
    args = parser.parse_args()
    if args.action == "stop":
        print("stopped TorchServe" if stop(args.workdir) else f"no TorchServe running from {args.workdir}")
        return
    if (args.workdir / "torchserve.pid").is_file():
        stop(args.workdir)
    models = dict(item.split("=", 1) for item in args.models)
    started = time.monotonic()
    process = start(args.workdir, models, model_store=args.model_store)
    keys = read_keys(args.workdir.resolve())
    print(f"TorchServe pid {process.pid} serving {', '.join(models)} on 127.0.0.1 "
          f"(inference 8080, management 8081, metrics 8082, gRPC 7070/7071), ready in "
          f"{time.monotonic() - started:.1f} s; logs in {args.workdir.resolve() / 'logs'}")
    print(f"inference key: {keys['inference']}  (all keys: {args.workdir.resolve() / 'key_file.json'})")
    print(f"try: curl -H 'Authorization: Bearer {keys['inference']}' -T XRAY.jpeg "
          f"http://127.0.0.1:8080/predictions/{next(iter(models))}")


if __name__ == "__main__":
    main()
