"""Our own servers beside TorchServe (the demo page, the DICOM node) run in the background the same way: a
process in its own session, its output in `<workdir>/<name>.out`, its pid in `<workdir>/<name>.pid`, started when
its port answers, stopped (the whole session) by `stop`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from cxr.paths import REPO


def start(command: list[str], workdir: Path, name: str, port: int, host: str = "127.0.0.1",
          timeout: float = 30.0) -> subprocess.Popen:
    """Run `command` in the background and wait until `host:port` accepts a connection; returns the process."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stop(workdir, name)
    log = workdir / f"{name}.out"
    with open(log, "ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=REPO)
    (workdir / f"{name}.pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited; see {log}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{name} did not start within {timeout:.0f} s; see {log}")


def stop(workdir: Path, name: str) -> None:
    pid_file = Path(workdir) / f"{name}.pid"
    if pid_file.is_file():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass
        pid_file.unlink()
