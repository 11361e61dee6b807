"""The DICOM node: a C-STORE SCP on 127.0.0.1:11112 (AE title CXR) that queues what it receives (cxr.dicom.spool)
and a worker that answers each eligible film (cxr.dicom.eligibility) through TorchServe with a Structured
Report sent back to the PACS (or kept on disk) and a FHIR DiagnosticReport (cxr.dicom.results).

    cxr dicom-node --allow ORTHANC --send-to ORTHANC@127.0.0.1:4242 [--config node.toml]
    python -m cxr.dicom.node start / stop --workdir logs/serve    # what `make dicom-node` / `make stop` do

While TorchServe is down, restarting or has not registered the model yet, films wait in the queue and are
tried again (back-off up to `max_delay`); the key file is read again when TorchServe refuses the key (a
restarted TorchServe makes new keys). A film the server cannot answer for its own reasons (500) is tried `max_failures`
times, then reported as not answered (an SR saying so), never dropped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr import background
from cxr.client import Client, PredictionError
from cxr.dicom.config import NodeConfig, add_options, config_from
from cxr.dicom.eligibility import DECODED_SYNTAXES, skip_reason
from cxr.dicom.results import Result, fhir_report, secondary_capture, structured_report
from cxr.dicom.spool import Queued, Spool
from cxr.server import KeyFileError, read_key_file

TRANSIENT = (404, 500, 502, 503, 504, 507)  # server down, restarting, model not registered yet, worker died
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_OUT_OF_RESOURCES = 0xA700
STORED = (0x0000, 0xB000, 0xB006, 0xB007)  # success, and the warnings a PACS gives while storing
# How often an association's two threads (pynetdicom's network and DIMSE loops) look for work. pynetdicom's
# DIMSE loop sleeps 1 ms per turn, hard-coded: a thousand wake-ups a second per open association, each taking
# the interpreter lock from the workers; at 5 ms a film waits at most that per step.
POLL_SECONDS = 0.005
MAX_PDU_BYTES = 1 << 20  # P-DATA fragments a sender may send: a film in a few PDUs, not hundreds of 16 kB ones
IDLE_RELEASE_SECONDS = 2.0  # a worker releases its association with the destination after this long idle


class _ReactorClock:
    """`time` as pynetdicom's association module sees it in the node: its 1 ms loop sleep lasts POLL_SECONDS
    (its shorter waits, and the rest of `time`, as they are)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(POLL_SECONDS if seconds == 0.001 else seconds)


class Transient(Exception):
    """Try this film again later (the server or the destination is not there)."""


class Node:
    def __init__(self, config: NodeConfig, connect: Callable[[], Client] | None = None) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.connect = connect or self._client  # called again when TorchServe refuses the key (a restart)
        self.client: Client | None = None  # connected at the first film: TorchServe may start after the node
        self.stopping = threading.Event()
        self.arrived = threading.Semaphore(0)  # one release per film queued: one waiting worker starts at once
        self.server: Any = None
        self.threads: list[threading.Thread] = []
        self._versions: dict[str, str] = {}
        self._local = threading.local()  # each worker's association with the destination, and when it last sent
        self._received: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # bytes per association

    def _client(self) -> Client:
        return Client.from_key_file(self.config.key_file, ports={"inference": self.config.inference_port,
                                                                 "grpc_inference": self.config.grpc_port},
                                    timeout=60, retries=0)

    # --- receiving --------------------------------------------------------------------------------------------
    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, _config, association, evt
        from pynetdicom.sop_class import Verification

        association.time = _ReactorClock()  # type: ignore[assignment]
        _config.STORE_RECV_CHUNKED_DATASET = True  # a received dataset goes to a temporary file, not to memory
        ae = AE(ae_title=self.config.ae_title)
        ae.require_calling_aet = list(self.config.allow)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, list(DECODED_SYNTAXES))
        ae.add_supported_context(Verification)
        ae.maximum_associations = 8
        ae.maximum_pdu_size = MAX_PDU_BYTES
        self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_ABORTED, self._on_gone), (evt.EVT_CONN_CLOSE, self._on_gone),
            (evt.EVT_CONN_OPEN, self._on_open)])
        for index in range(self.config.workers):
            thread = threading.Thread(target=self._drain, name=f"dicom-worker-{index}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _on_store(self, event: Any) -> int:
        """Write the instance to the queue before acknowledging it; failure statuses for what cannot be kept."""
        from pydicom import dcmread

        path, calling_ae = Path(event.dataset_path), event.assoc.requestor.ae_title
        self._received[event.assoc] = 0
        size = path.stat().st_size
        if size > self.config.max_bytes:
            self.spool.record(event="rejected", calling_ae=calling_ae, outcome="rejected",
                              detail={"reason": f"{size} bytes, over the node's limit of {self.config.max_bytes}"})
            return FAILURE_OUT_OF_RESOURCES
        try:
            header = dcmread(path, stop_before_pixels=True)
            sop_uid = str(header.SOPInstanceUID)
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for broken files
            self.spool.record(event="rejected", calling_ae=calling_ae, outcome="rejected",
                              detail={"reason": f"unreadable dataset: {error}"[:500]})
            return FAILURE_CANNOT_UNDERSTAND
        self.spool.enqueue(path, sop_uid, calling_ae, {"study_uid": str(header.get("StudyInstanceUID", "")),
                                                       "series_uid": str(header.get("SeriesInstanceUID", ""))})
        self.arrived.release()
        return 0x0000

    def _on_data(self, event: Any) -> None:
        """Count the bytes an association sent since its last instance: far over `max_bytes` (more than one PDU
        over) the sender is cut off at once, before the dataset fills the disk; just over, `_on_store` refuses."""
        received = self._received.get(event.assoc, 0) + len(event.data)
        self._received[event.assoc] = received
        if received > self.config.max_bytes + MAX_PDU_BYTES >= received - len(event.data):
            self.spool.record(event="rejected", calling_ae=event.assoc.requestor.ae_title, outcome="rejected",
                              detail={"reason": f"over the node's limit of {self.config.max_bytes} bytes while "
                                                "receiving: association aborted"})
            event.assoc.abort(block=False)

    @staticmethod
    def _on_open(event: Any) -> None:
        """A sender's association polls the network as the node's own do (POLL_SECONDS)."""
        event.assoc.dul._run_loop_delay = POLL_SECONDS

    @staticmethod
    def _on_gone(event: Any) -> None:
        """A sender gone mid-transfer (or cut off): pynetdicom keeps the part of the dataset it received in a
        temporary file and leaves it there; it is removed, so nothing half-written stays behind (closed once the
        connection is: PDUs already read may still be written to it until then)."""
        partial = getattr(getattr(event.assoc.dimse, "message", None), "_data_set_file", None)
        if partial is not None:
            Path(partial.name).unlink(missing_ok=True)
            if event.event.name == "EVT_CONN_CLOSE":
                partial.close()

    # --- answering --------------------------------------------------------------------------------------------
    def _drain(self) -> None:
        while not self.stopping.is_set():
            item = self.spool.claim()
            if item is None:
                self._release_destination(idle_for=IDLE_RELEASE_SECONDS)
                self.arrived.acquire(timeout=0.1)  # or a film waiting for its next try is due
                continue
            delay = min(self.config.max_delay, 0.5 * 2 ** min(item.attempts, 6))
            try:
                outcomes = self.answer(item)
            except Transient as error:
                self.spool.retry_later(item, str(error), delay)
                continue
            except Exception as error:  # noqa: BLE001 - a film the node itself cannot handle must not stop a worker
                if item.attempts + 1 < self.config.max_failures:
                    self.spool.retry_later(item, f"{type(error).__name__}: {error}", delay)
                    continue
                outcomes = [{"event": "done", "calling_ae": item.calling_ae, "sop_uid": item.sop_instance_uid,
                             "received": item.received, "outcome": "failed", "latency_ms": self._since(item),
                             "detail": {"error": f"{type(error).__name__}: {error}"[:500],
                                        "attempts": item.attempts + 1}}]
            self.spool.finish(item, outcomes)
        self._release_destination(idle_for=0.0)

    def _release_destination(self, idle_for: float) -> None:
        """Release this worker's association with the destination once it sent nothing for `idle_for` seconds:
        an open association keeps network threads polling."""
        held = getattr(self._local, "association", None)
        if held is not None and time.monotonic() - self._local.last_sent >= idle_for:
            self._local.association = None
            if held.is_established:
                held.release()

    def answer(self, item: Queued) -> list[dict[str, Any]]:
        """The audit rows of one film: skipped with its reason, or one per model with its SR (and FHIR) sent."""
        import hashlib

        from pydicom import dcmread

        data = item.file.read_bytes()  # read once: parsed (what the reports copy and reference) and sent as it is
        dataset = dcmread(io.BytesIO(data))
        pixels = dataset.get("PixelData")
        base = {"event": "done", "calling_ae": item.calling_ae, "study_uid": str(dataset.get("StudyInstanceUID", "")),
                "series_uid": str(dataset.get("SeriesInstanceUID", "")), "sop_uid": item.sop_instance_uid,
                "pixel_sha256": hashlib.sha256(pixels).hexdigest() if pixels is not None else None,
                "received": item.received}
        reason = skip_reason(dataset, str(dataset.file_meta.get("TransferSyntaxUID", "")))
        if reason:
            return [{**base, "outcome": "skipped", "detail": {"reason": reason}, "latency_ms": self._since(item)}]
        outcomes = []
        for model in self.config.models_for(item.calling_ae):
            result = self._ask(model, data, item)
            report = structured_report(dataset, result)
            self._deliver(report)
            overlay = self._overlay(dataset, result, data) if self.config.secondary_capture else {}
            uids = result.uids(dataset)
            if self.config.fhir_dir or self.config.fhir_url:
                self._write_fhir(fhir_report(dataset, result, base["pixel_sha256"] or ""))
            detail = {"label": result.label, "probabilities": result.probabilities, "threshold": result.threshold,
                      "population": result.population} if not result.refusal else result.refusal
            outcomes.append({**base, "model": model, "version": result.version, "outcome": result.outcome,
                             "result_uids": {"sr": uids["sr"], "sr_series": uids["series"], **overlay,
                                             "fhir_report": uids["report"]},
                             "detail": detail, "latency_ms": self._since(item)})
        return outcomes

    def _overlay(self, dataset: Any, result: Result, data: bytes) -> dict[str, str]:
        """The Grad-CAM image sent beside an answer's SR: {"sc": its UID}, or why there is none (an answer
        never waits for its picture: a refusal has none, a server without the eager archive gives none)."""
        if result.refusal:
            return {}
        try:
            explained = self.client.explain(data, model=f"{result.model}_eager")
            image = secondary_capture(dataset, result, explained["overlay_png"])
        except (PredictionError, KeyError, ValueError, OSError) as error:
            return {"sc_not_made": f"{type(error).__name__}: {error}"[:300]}
        self._deliver(image)
        return {"sc": result.uids(dataset)["sc"]}

    @staticmethod
    def _since(item: Queued) -> float:
        return round(1000 * (time.time() - item.received), 1)

    def _ask(self, model: str, data: bytes, item: Queued) -> Result:
        try:
            if self.client is None:
                self.client = self.connect()
            answer = self.client.predict(data, model=model, protocol=self.config.protocol)
            self._versions[model] = str(answer.get("version", ""))
            return Result.from_answer(model, answer)
        except KeyFileError as error:  # no TorchServe yet (or its key file is being rewritten)
            raise Transient(str(error)) from error
        except PredictionError as error:
            if error.status == 401 or error.details.get("type") == "InvalidKeyException":  # restarted: new keys
                self.client = self.connect()
                raise Transient(f"{model}: {error}") from error
            given_up = error.status == 500 and item.attempts + 1 >= self.config.max_failures
            if error.status in TRANSIENT and not given_up:
                raise Transient(f"{model}: {error}") from error
            return Result.from_refusal(model, self._version(model), error.status, error.message, error.details)

    def _version(self, model: str) -> str:
        """The served version for a refusal's report (an answer names its own)."""
        if model not in self._versions:
            try:
                keys = read_key_file(self.config.key_file)
                client = Client(keys, ports={"management": self.config.management_port}, timeout=5, retries=0) \
                    if "management" in keys else None
                self._versions[model] = client.default_version(model) if client else "unknown"
            except (PredictionError, OSError, ValueError, KeyError):
                return "unknown"
        return self._versions[model]

    def _deliver(self, report: Any) -> None:
        """C-STORE a report (the SR or the Grad-CAM image) to the destination, or keep it in
        <spool>/reports/<study>/ without one."""
        if self.config.destination() is None:
            folder = Path(self.config.spool) / "reports" / str(report.StudyInstanceUID)
            folder.mkdir(parents=True, exist_ok=True)
            temporary = folder / f".{report.SOPInstanceUID}.tmp"
            report.save_as(temporary, enforce_file_format=True)
            os.replace(temporary, folder / f"{report.SOPInstanceUID}.dcm")
            return
        for attempt in range(2):  # a kept association the PACS has since closed: once more on a new one
            association = self._association(fresh=attempt > 0)
            try:
                status = association.send_c_store(report)
            except (RuntimeError, ValueError, OSError):
                status = None
            if status is not None and status.get("Status") in STORED:
                self._local.last_sent = time.monotonic()
                return
        raise Transient(f"{self.config.send_to} did not store the SR (status {getattr(status, 'Status', None)})")

    def _association(self, fresh: bool) -> Any:
        """This worker's association with the destination, kept from one report to the next."""
        from pynetdicom import AE
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

        held = getattr(self._local, "association", None)
        if held is not None and held.is_established and not fresh:
            return held
        if held is not None and held.is_established:
            held.abort()
        title, host, port = self.config.destination()
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(ComprehensiveSRStorage, "1.2.840.10008.1.2.1")
        ae.add_requested_context(SecondaryCaptureImageStorage, "1.2.840.10008.1.2.1")
        association = ae.associate(host, port, ae_title=title)
        if not association.is_established:
            raise Transient(f"cannot associate with {self.config.send_to}")
        association.dul._run_loop_delay = POLL_SECONDS
        self._local.association, self._local.last_sent = association, time.monotonic()
        return association

    def _write_fhir(self, document: dict[str, Any]) -> None:
        if self.config.fhir_dir:
            folder = Path(self.config.fhir_dir)
            folder.mkdir(parents=True, exist_ok=True)
            temporary = folder / f".{document['id']}.tmp"
            temporary.write_text(json.dumps(document, indent=1))
            os.replace(temporary, folder / f"{document['id']}.json")
        if self.config.fhir_url:
            request = urllib.request.Request(f"{self.config.fhir_url.rstrip('/')}/DiagnosticReport/{document['id']}",
                                             data=json.dumps(document).encode(), method="PUT",
                                             headers={"Content-Type": "application/fhir+json"})
            try:
                with urllib.request.urlopen(request, timeout=30):
                    pass
            except OSError as error:
                raise Transient(f"FHIR endpoint {self.config.fhir_url}: {error}") from error

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=30)
        self.spool.close()


def serve(config: NodeConfig) -> None:
    node = Node(config)
    node.start()
    signal.signal(signal.SIGTERM, lambda *_: node.stopping.set())
    print(f"DICOM node {config.ae_title} on {config.host}:{config.port}; allowed callers {','.join(config.allow)}; "
          f"models {','.join(config.models)}; reports to {config.send_to or Path(config.spool) / 'reports'}; "
          f"queue {config.spool} ({node.spool.waiting()} waiting)", flush=True)
    try:
        while not node.stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


def start(args: argparse.Namespace) -> None:
    """Run the node in the background (cxr.background), pid file and log in --workdir."""
    config = config_from(args)
    passed = [item for name, value in vars(args).items() if value is not None and name not in ("action", "workdir")
              for item in (f"--{name.replace('_', '-')}", str(value))]
    background.start([sys.executable, "-m", "cxr.dicom.node", "serve", *passed], Path(args.workdir), "dicom-node",
                     config.port, config.host)
    print(f"DICOM node {config.ae_title} on {config.host}:{config.port} (log {Path(args.workdir) / 'dicom-node.out'})")


def stop(args: argparse.Namespace) -> None:
    background.stop(Path(args.workdir), "dicom-node")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cxr.dicom.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["serve", "start", "stop"])
    parser.add_argument("--workdir", default="logs/serve", help="where the pid file and the log go")
    add_options(parser)
    args = parser.parse_args(argv)
    if args.action == "serve":
        serve(config_from(args))
    else:
        {"start": start, "stop": stop}[args.action](args)


if __name__ == "__main__":
    main()

