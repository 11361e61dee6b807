"""`make dicom-drills`: the DICOM node (cxr/dicom) under the failures a hospital network brings, with a real PACS
(Orthanc) and a real TorchServe (the shipped `pneumonia` archive) on free loopback ports; the node runs as its own
process, as `make dicom-node` runs it. Results: docs/dicom_drills.md (and .json).

    python -m loadtest.dicom_drill [--films 200] [--outage 30] [--output docs/dicom_drills.md]

- outage: Orthanc sends --films films to the node; once a quarter are answered, TorchServe is stopped for
  --outage seconds, then started again (with new keys). Goal: as many SRs in Orthanc as films, none lost, none
  twice, the audit log complete.
- kill: a pynetdicom sender streams films; the node is killed with SIGKILL mid-stream and started again. Goal:
  every film acknowledged before the kill answered after the restart.
- throughput: rounds of new films, each round through `cxr predict`'s client over REST (one after the other),
  then through the node (Orthanc sends them in one C-STORE job; SRs stored in Orthanc). Goal: node >= 0.8x
  REST in films/s (the median of the rounds' ratios); the latency from reception to SR stored, reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxr import background, server
from cxr.client import Client
from cxr.commands import command_parser
from cxr.dicom.config import NodeConfig
from cxr.dicom.spool import read_audit
from cxr.paths import REPO
from cxr.report import write_markdown_and_json
from cxr.server import free_ports
from loadtest.dicom_films import fixture_pixels, study_film
from loadtest.pacs import Orthanc

ROOT_UID = "1.2.826.0.1.3680043.10.3"
TAGS = {"outage": 1, "kill": 2, "speed": 3}  # UIDs are digits


def film_uid(tag: str, k: int, per_study: int = 10) -> str:
    return f"{ROOT_UID}.{TAGS[tag]}.{k // per_study}.1.{k}"


def films(tag: str, count: int, start: int = 0, per_study: int = 10) -> list[bytes]:
    """`count` distinct DX films (the example X-rays at 256 px) numbered from `start`, `per_study` to a study."""
    def study(k: int) -> str:
        return f"{ROOT_UID}.{TAGS[tag]}.{k // per_study}"

    return [study_film(fixture_pixels(k), study=study(k), series=f"{study(k)}.1", instance=film_uid(tag, k, per_study))
            for k in range(start, start + count)]


class Drill:
    def __init__(self, folder: Path, model_store: Path, workers: int) -> None:
        self.folder, self.model_store, self.workers = folder, model_store, workers
        names = ["inference", "management", "metrics", "grpc_inference", "grpc_management"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.serve_dir = folder / "serve"
        self.node_port = free_ports(1)[0]
        self.pacs = Orthanc(folder / "orthanc", "CXR", self.node_port)
        self.torchserve = self.start_torchserve()
        self.node: subprocess.Popen | None = None
        self.spool = folder / "spool"

    def start_torchserve(self) -> subprocess.Popen:
        return server.start(self.serve_dir, {"pneumonia": "pneumonia.mar"}, model_store=self.model_store,
                            ports=self.ports, timeout=900)

    def start_node(self) -> None:
        command = [sys.executable, "-m", "cxr.dicom.node", "serve", "--port", str(self.node_port),
                   "--allow", "ORTHANC,DRILL", "--send-to", f"ORTHANC@127.0.0.1:{self.pacs.dicom_port}",
                   "--spool", str(self.spool), "--key-file", str(self.serve_dir / "key_file.json"),
                   "--inference-port", str(self.ports["inference"]),
                   "--management-port", str(self.ports["management"]), "--workers", str(self.workers)]
        self.node = background.start(command, self.folder, "dicom-node", self.node_port, timeout=60)

    def kill_node(self) -> None:
        assert self.node is not None
        self.node.send_signal(signal.SIGKILL)
        self.node.wait()

    def stop_node(self) -> None:
        if self.node is not None and self.node.poll() is None:
            self.node.terminate()
            self.node.wait(timeout=60)

    def done_rows(self, since: float | None = None) -> list[dict[str, Any]]:
        return [row for row in read_audit(self.spool, since=since) if row["event"] == "done"]

    def wait_answered(self, uids: set[str], timeout: float, since: float | None = None, poll: float = 0.5) -> float:
        """Seconds until every SOP UID in `uids` has its outcome in the audit log (rows from `since` on)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if uids <= {row["sop_uid"] for row in self.done_rows(since)}:
                return time.monotonic() - started
            time.sleep(poll)
        missing = len(uids - {row["sop_uid"] for row in self.done_rows(since)})
        raise TimeoutError(f"{missing} of {len(uids)} films still unanswered after {timeout:.0f} s")

    def reports_in_pacs(self, prefix: str) -> list[dict[str, Any]]:
        """The SRs Orthanc holds for studies under `prefix`: [{sr uid, source uid}]."""
        found = self.pacs.call("/tools/find", json.dumps({"Level": "Instance", "Query": {"Modality": "SR"},
                                                          "Expand": True}).encode(), "POST")
        reports = []
        for item in found:
            tags = self.pacs.tags(item["ID"])
            if tags.get("StudyInstanceUID", "").startswith(prefix):
                reports.append({"sr": tags["SOPInstanceUID"], "study": tags["StudyInstanceUID"]})
        return reports

    def close(self) -> None:
        self.stop_node()
        server.stop_process(self.torchserve)
        self.pacs.stop()


def outage(drill: Drill, count: int, seconds: float) -> dict[str, Any]:
    batch = films("outage", count)
    studies = sorted({drill.pacs.upload(film)["ParentStudy"] for film in batch})
    uids = {film_uid("outage", k) for k in range(count)}
    sender = threading.Thread(target=lambda: [drill.pacs.send(study) for study in studies])
    started = time.monotonic()
    sender.start()
    while len(drill.done_rows()) < count // 4:
        time.sleep(0.2)
    answered_before = len(drill.done_rows())
    server.stop_process(drill.torchserve)
    stopped = time.monotonic()
    time.sleep(seconds)
    drill.torchserve = drill.start_torchserve()
    restarted = time.monotonic()
    sender.join()
    drill.wait_answered(uids, timeout=900)
    total = time.monotonic() - started
    time.sleep(2)  # the last C-STOREs into Orthanc
    reports = drill.reports_in_pacs(f"{ROOT_UID}.{TAGS['outage']}.")
    rows = [row for row in drill.done_rows() if row["sop_uid"] in uids]
    return {"films": count, "answered_before_stop": answered_before, "stopped_s": round(restarted - stopped, 1),
            "seconds": round(total, 1), "reports_in_pacs": len(reports),
            "distinct_reports": len({r["sr"] for r in reports}), "audit_outcomes": len(rows),
            "audit_distinct_films": len({row["sop_uid"] for row in rows}),
            "lost": len(uids - {row["sop_uid"] for row in rows}),
            "outcomes": {o: sum(row["outcome"] == o for row in rows) for o in {row["outcome"] for row in rows}}}


def kill(drill: Drill, count: int) -> dict[str, Any]:
    from pydicom import dcmread
    from pynetdicom import AE

    batch = films("kill", count)
    acknowledged: list[str] = []

    def stream() -> None:
        ae = AE(ae_title="DRILL")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", drill.node_port, ae_title="CXR")
        for film in batch:
            dataset = dcmread(io.BytesIO(film))
            try:
                status = assoc.send_c_store(dataset)
            except (RuntimeError, ValueError, OSError):
                return
            if not assoc.is_established or status is None or "Status" not in status:
                return
            if status.Status == 0:
                acknowledged.append(str(dataset.SOPInstanceUID))
        assoc.release()

    sender = threading.Thread(target=stream)
    sender.start()
    while len(acknowledged) < count // 3:
        time.sleep(0.01)
    drill.kill_node()
    killed_after = len(acknowledged)
    sender.join(timeout=60)
    drill.start_node()
    seconds = drill.wait_answered(set(acknowledged), timeout=900)
    answered = {row["sop_uid"] for row in drill.done_rows()}
    return {"films_streamed": count, "acknowledged_before_kill": killed_after,
            "acknowledged_in_all": len(acknowledged), "answered_after_restart": len(set(acknowledged) & answered),
            "seconds_to_answer_after_restart": round(seconds, 1)}


def throughput(drill: Drill, count: int, rounds: int = 5) -> dict[str, Any]:
    """Rounds of `count` new films, each through REST then through the node: films/s of each and their ratio
    per round (medians reported: a 2-core machine is noisy), latencies over every round."""
    rest_rates, node_rates, rest_latencies, node_latencies = [], [], [], []
    for round_index in range(rounds):
        batch = films("speed", count, start=round_index * count)
        uids = {film_uid("speed", k) for k in range(round_index * count, (round_index + 1) * count)}
        rest_seconds, latencies = rest_pass(drill, batch)
        node_seconds = node_pass(drill, batch, uids)
        rest_rates.append(count / rest_seconds)
        node_rates.append(count / node_seconds)
        rest_latencies += latencies
        node_latencies += [row["latency_ms"] for row in drill.done_rows() if row["sop_uid"] in uids]
    ratios = [node / rest for node, rest in zip(node_rates, rest_rates, strict=True)]
    return {"films": count, "rounds": rounds, "rest_films_per_s": round(statistics.median(rest_rates), 2),
            "node_films_per_s": round(statistics.median(node_rates), 2), "ratio": round(statistics.median(ratios), 3),
            "ratios": [round(ratio, 3) for ratio in ratios],
            "rest_median_ms": round(statistics.median(rest_latencies), 1),
            "rest_p90_ms": round(float(np.percentile(rest_latencies, 90)), 1),
            "node_median_received_to_sr_stored_ms": round(statistics.median(node_latencies), 1),
            "node_p90_received_to_sr_stored_ms": round(float(np.percentile(node_latencies, 90)), 1),
            "node_max_received_to_sr_stored_ms": round(max(node_latencies), 1)}


def rest_pass(drill: Drill, batch: list[bytes]) -> tuple[float, list[float]]:
    """Seconds for the films one after the other through `cxr predict`'s client, and each one's latency (ms)."""
    client = Client(server.read_keys(drill.serve_dir), ports={"inference": drill.ports["inference"]}, timeout=60)
    latencies = []
    started = time.monotonic()
    for film in batch:
        begun = time.monotonic()
        client.predict(film, model="pneumonia")
        latencies.append(1000 * (time.monotonic() - begun))
    return time.monotonic() - started, latencies


def node_pass(drill: Drill, batch: list[bytes], uids: set[str]) -> float:
    """Seconds from Orthanc starting to send the films (one C-STORE job, one association) to the last one's SR
    stored (`uids`: the films' SOP Instance UIDs). The films are uploaded to Orthanc first, untimed: the PACS
    sends what it stores, as in a hospital. (A pynetdicom sender in this process would take CPU from the node
    on a small machine: its loops poll every millisecond.)"""
    instances = [drill.pacs.upload(film)["ID"] for film in batch]
    started, since = time.monotonic(), time.time()
    drill.pacs.send(*instances)
    drill.wait_answered(uids, timeout=900, since=since, poll=0.05)  # a poll of rows since the start: cheap
    return time.monotonic() - started


def met(condition: bool) -> str:
    return "yes" if condition else "**no**"


def markdown(results: dict[str, Any]) -> str:
    out, killed, speed = results["outage"], results["kill"], results["throughput"]
    rows = [
        (f"TorchServe down {out['stopped_s']:.0f} s mid-stream (stopped {results['outage_seconds']:g} s, then its "
         f"start-up; {out['answered_before_stop']} of {out['films']} answered before)",
         f"{out['films']} SRs in Orthanc, 0 lost, 0 twice, audit complete",
         f"{out['reports_in_pacs']} SRs ({out['distinct_reports']} distinct), {out['lost']} lost, audit "
         f"{out['audit_outcomes']} outcomes for {out['audit_distinct_films']} films; {out['seconds']:.0f} s in all",
         met(out["reports_in_pacs"] == out["distinct_reports"] == out["films"] and not out["lost"])),
        ("node killed (SIGKILL) mid-stream, started again", "every acknowledged film answered",
         f"{killed['answered_after_restart']} of {killed['acknowledged_in_all']} acknowledged films answered "
         f"({killed['acknowledged_before_kill']} acknowledged when killed; all answered "
         f"{killed['seconds_to_answer_after_restart']:.0f} s after the restart)",
         met(killed["answered_after_restart"] == killed["acknowledged_in_all"])),
        (f"throughput, {speed['rounds']} rounds of {speed['films']} new films, each through REST, then sent by "
         "Orthanc through the node",
         "node >= 0.8x REST", f"medians: node {speed['node_films_per_s']} films/s, REST {speed['rest_films_per_s']} "
         f"films/s: **{speed['ratio']:.2f}x** (rounds: {', '.join(f'{r:.2f}x' for r in speed['ratios'])})",
         met(speed["ratio"] >= 0.8)),
    ]
    lines = ["# DICOM node drills", "",
             f"`python -m loadtest.dicom_drill --films {out['films']} --outage {results['outage_seconds']:g}` "
             f"({results['when']}, {results['cpus']} CPU cores): the node as its own process between a real Orthanc "
             "and a real TorchServe serving `pneumonia`, all on loopback.", "",
             "| drill | goal | measured | met |", "|---|---|---|---|",
             *(f"| {' | '.join(row)} |" for row in rows), "",
             "Latency through the node, from reception to the SR stored in Orthanc, the films sent back to back: "
             f"median {speed['node_median_received_to_sr_stored_ms']:.0f} ms, "
             f"p90 {speed['node_p90_received_to_sr_stored_ms']:.0f} ms, "
             f"max {speed['node_max_received_to_sr_stored_ms']:.0f} ms (the REST answer alone: "
             f"median {speed['rest_median_ms']:.0f} ms, p90 {speed['rest_p90_ms']:.0f} ms)."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dicom-drill-") as scratch:
        drill = Drill(Path(scratch), Path(args.model_store), args.workers)
        try:
            drill.start_node()
            results = {"outage_seconds": args.outage, "when": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                       "outage": outage(drill, args.films, args.outage), "kill": kill(drill, args.films // 2),
                       "throughput": throughput(drill, args.speed_films, args.speed_rounds)}
        finally:
            drill.close()
    print(json.dumps(results, indent=1))
    write_markdown_and_json(args.output, markdown(results), results)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--films", type=int, default=200)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds TorchServe stays stopped")
    parser.add_argument("--speed-films", type=int, default=60, help="films per throughput round")
    parser.add_argument("--speed-rounds", type=int, default=5, help="throughput rounds (the median ratio counts)")
    parser.add_argument("--workers", type=int, default=NodeConfig.workers, help="the node's workers")
    parser.add_argument("--model-store", default=str(REPO / "model_store"))
    parser.add_argument("--output", default="runs/reports/dicom_drills.md")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
