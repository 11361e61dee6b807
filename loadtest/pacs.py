"""A real PACS for the DICOM node's tests and drills: Debian's Orthanc (`make pacs` installs it; AGPL, never shipped),
started on free loopback ports with a generated configuration and stopped after, and a few calls of its REST API.

Orthanc 1.10 binds its DICOM port on every interface and has no option to change that; orthanc_loopback.c,
preloaded, turns that bind into a bind to 127.0.0.1. Its HTTP server refuses remote hosts
(`RemoteAccessAllowed: false`) and its DICOM server accepts C-STORE from the node's AE title only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from cxr.server import free_ports

SHIM = Path(__file__).with_name("orthanc_loopback.c")


class PacsMissing(RuntimeError):
    """Orthanc or the compiler for its loopback shim is not installed."""


class Orthanc:
    def __init__(self, folder: Path, node_title: str, node_port: int) -> None:
        binary = shutil.which("Orthanc")
        compiler = shutil.which("cc") or shutil.which("gcc")
        if binary is None or compiler is None:
            raise PacsMissing("no Orthanc (make pacs) or no C compiler (make compiler) here")
        folder.mkdir(parents=True, exist_ok=True)
        shim = folder / "loopback.so"
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM), "-ldl"], check=True)
        self.http_port, self.dicom_port = free_ports(2)
        self.title = "ORTHANC"
        config = {"Name": "cxr-test-pacs", "StorageDirectory": str(folder / "storage"),
                  "IndexDirectory": str(folder / "storage"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
                  "DicomAet": self.title, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
                  "DicomModalities": {"cxr": {"AET": node_title, "Host": "127.0.0.1", "Port": node_port,
                                              "AllowStore": True, "AllowEcho": True}},
                  "DicomScuTimeout": 30, "HttpTimeout": 60, "Plugins": [], "LuaScripts": []}
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT, env={"LD_PRELOAD": str(shim), "PATH": "/usr/bin"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {folder / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not start within 60 s")

    def call(self, path: str, body: bytes | None = None, method: str | None = None,
             content_type: str = "application/json") -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method,
                                         headers={"Content-Type": content_type} if body is not None else {})
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return json.loads(data) if response.headers.get_content_type() == "application/json" else data

    def get(self, path: str) -> Any:
        return self.call(path)

    def upload(self, dicom: bytes) -> dict[str, Any]:
        return self.call("/instances", dicom, "POST", "application/dicom")

    def send(self, *resources: str, modality: str = "cxr") -> Any:
        """Orthanc C-STOREs studies, series or instances to a modality in one job (one association), and waits
        until they are sent."""
        return self.call(f"/modalities/{modality}/store", json.dumps({"Resources": list(resources),
                                                                     "Synchronous": True}).encode(), "POST")

    def study_instances(self, study_id: str, modality: str | None = None) -> list[dict[str, Any]]:
        found = self.get(f"/studies/{study_id}/instances")
        return [item for item in found if modality is None or self.tags(item["ID"]).get("Modality") == modality]

    def tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def file(self, instance_id: str) -> bytes:
        return self.call(f"/instances/{instance_id}/file")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
