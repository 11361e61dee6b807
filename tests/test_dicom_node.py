"""The DICOM node without TorchServe: the durable queue and its audit log, and the SCP end to end with pynetdicom
as the sender and a stand-in for the server."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading
import time

import pytest
from PIL import Image
from pydicom import dcmread

from cxr.client import PredictionError
from cxr.dicom.config import NodeConfig, load_config
from cxr.dicom.node import Node
from cxr.dicom.spool import Spool, read_audit
from cxr.server import free_ports
from loadtest.dicom_films import study_film, write_film
from tests.dicom_support import ANSWER, REFUSAL, send, wait_until_drained


def test_the_queue_is_durable_deduplicated_and_the_audit_log_append_only(tmp_path):
    film = write_film(tmp_path / "in", "a.dcm", instance="1.2.3.4")
    spool = Spool(tmp_path / "spool")
    assert spool.enqueue(film, "1.2.3.4", "ORTHANC", {"study_uid": "9"})
    assert not spool.enqueue(film, "1.2.3.4", "ORTHANC", {"study_uid": "9"})  # the sender's retry
    (tmp_path / "spool" / "incoming" / "half.dcm").write_bytes(b"partial")  # a crash before the commit
    spool.close()
    spool = Spool(tmp_path / "spool")  # a restart: the queued film is still there, the orphan is gone
    item = spool.claim()
    assert item is not None and item.file.read_bytes() == film.read_bytes()
    assert not (tmp_path / "spool" / "incoming" / "half.dcm").exists()
    spool.finish(item, [{"event": "done", "sop_uid": "1.2.3.4", "outcome": "answered", "study_uid": "9"}])
    assert spool.claim() is None and not item.file.exists()
    database = sqlite3.connect(tmp_path / "spool" / "node.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        database.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        database.execute("UPDATE audit SET outcome = 'x'")
    rows = read_audit(tmp_path / "spool", study="9")
    assert [row["event"] for row in rows] == ["received", "done"]
    assert [row["outcome"] for row in read_audit(tmp_path / "spool", outcome="answered")] == ["answered"]


class StandIn:
    """TorchServe's answers without TorchServe: `down` calls fail as if it were stopped."""

    def __init__(self, down: int = 0, explains: bool = True) -> None:
        self.down, self.calls, self.connections, self.explains = down, 0, 0, explains
        self.lock = threading.Lock()

    def connect(self) -> StandIn:
        self.connections += 1
        return self

    def predict(self, data: bytes, model: str = "pneumonia", version: str | None = None, protocol: str = "rest"):
        with self.lock:
            self.calls += 1
            if self.calls <= self.down:
                raise PredictionError(503, "cannot reach 127.0.0.1:8080: connection refused")
            if self.calls == self.down + 1:  # back, restarted: the key the node holds is no longer valid
                raise PredictionError(400, "Token Authorization failed", {"type": "InvalidKeyException"})
        dataset = dcmread(io.BytesIO(data))
        if str(dataset.get("PatientName", "")) == "OUTSIDE^FILM":
            raise PredictionError(*REFUSAL)
        return {**ANSWER, "model": model}

    def explain(self, data: bytes, model: str) -> dict:
        if not self.explains:
            raise PredictionError(404, f"Model not found: {model}")
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 40, 10)).save(buffer, format="PNG")
        return {**ANSWER, "overlay_png": base64.b64encode(buffer.getvalue()).decode()}


@pytest.fixture
def node(tmp_path):
    port = free_ports(1)[0]
    config = NodeConfig(port=port, allow=("SENDER",), spool=str(tmp_path / "spool"),
                        fhir_dir=str(tmp_path / "fhir"), max_delay=0.2)
    running = Node(config, connect=StandIn(down=3).connect)
    running.start()
    yield running
    running.stop()


def test_the_node_answers_each_film_skips_the_others_and_waits_out_a_server_outage(node, tmp_path):
    films = [study_film(instance="1.2.826.0.1.3680043.10.9.1"), study_film(view="LL"),
             study_film(PatientName="OUTSIDE^FILM"), study_film(instance="1.2.826.0.1.3680043.10.9.1")]
    assert send(node.config.port, films) == [0, 0, 0, 0]  # the last is a resend of the first: acknowledged
    wait_until_drained(node)
    rows = [row for row in read_audit(node.config.spool) if row["event"] == "done"]
    assert sorted(row["outcome"] for row in rows) == ["answered", "refused", "skipped"]
    assert node.client.calls == 3 + 1 + 2  # three 503s and a refused key waited out, then the two films once each
    assert node.client.connections == 2  # at the first film, and again after the key was refused
    reports = sorted((tmp_path / "spool" / "reports").rglob("*.dcm"))
    assert len(reports) == 2 and len(list((tmp_path / "fhir").glob("*.json"))) == 2
    for row in rows:
        assert row["calling_ae"] == "SENDER" and row["latency_ms"] >= 0
        if row["outcome"] != "skipped":
            assert len(row["pixel_sha256"]) == 64 and row["model"] == "pneumonia"


def test_an_unlisted_caller_is_refused_at_association(node):
    assert send(node.config.port, [study_film()], calling="STRANGER") == [None]


def test_the_config_file_and_the_command_line(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('allow = ["ORTHANC"]\nport = 11113\nmodels = ["pneumonia", "cxr4"]\n'
                    '[routes]\nMODALITY = ["adult"]\n')
    config = load_config(str(path), {"port": 11114, "send_to": "ORTHANC@127.0.0.1:4242"})
    assert config.port == 11114 and config.allow == ("ORTHANC",) and config.models_for("MODALITY") == ("adult",)
    assert config.models_for("ORTHANC") == ("pneumonia", "cxr4") and config.destination()[2] == 4242
    with pytest.raises(SystemExit, match="--allow"):
        load_config(None, {})
    with pytest.raises(ValueError, match="AET@HOST:PORT"):
        load_config(None, {"allow": "A", "send_to": "nowhere"})


def test_hostile_and_odd_instances_are_refused_or_skipped_and_the_node_goes_on(tmp_path):
    """A PDF is skipped; a dataset over the size limit and one that does not parse get failure statuses; a
    deflated dataset finds no accepted context; the film after them is answered."""
    import struct

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, EncapsulatedPDFStorage, ExplicitVRLittleEndian
    from pynetdicom import AE, _config

    port = free_ports(1)[0]
    node = Node(NodeConfig(port=port, allow=("SENDER",), spool=str(tmp_path / "spool"), max_bytes=200_000),
                connect=StandIn().connect)
    node.start()
    try:
        pdf = Dataset()
        pdf.SOPClassUID, pdf.SOPInstanceUID = EncapsulatedPDFStorage, "1.2.826.0.1.3680043.10.9.77"
        pdf.StudyInstanceUID, pdf.Modality = "1.2.826.0.1.3680043.10.9", "DOC"
        pdf.EncapsulatedDocument, pdf.MIMETypeOfEncapsulatedDocument = b"%PDF-1.4 not really", "application/pdf"
        pdf.file_meta = FileMetaDataset()
        pdf.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        huge = study_film(fixture_pixels_big())
        assert send(port, [study_film()]) == [0]
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(EncapsulatedPDFStorage, ExplicitVRLittleEndian)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
        assert assoc.is_established
        assert assoc.send_c_store(pdf).Status == 0x0000
        assert assoc.send_c_store(dcmread(io.BytesIO(huge))).Status == 0xA700
        assoc.release()
        broken = tmp_path / "broken.dcm"  # a valid file meta, then an element that claims 4 GB
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.9"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        holder = Dataset()
        holder.file_meta = meta
        holder.save_as(broken, enforce_file_format=True)
        with open(broken, "ab") as handle:
            handle.write(struct.pack("<HH2sHI", 0x0010, 0x0010, b"UN", 0, 0xFFFFFFF0) + b"\x00" * 64)
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
            assert assoc.send_c_store(broken).Status == 0xC000
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        deflated = AE(ae_title="SENDER")
        deflated.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", DeflatedExplicitVRLittleEndian)
        assoc = deflated.associate("127.0.0.1", port, ae_title="CXR")
        assert not assoc.accepted_contexts
        assoc.release()
        assert send(port, [study_film()]) == [0]  # still alive, still answering
        wait_until_drained(node)
        outcomes = [row["outcome"] for row in read_audit(tmp_path / "spool") if row["event"] != "received"]
        assert sorted(outcomes) == ["answered", "answered", "rejected", "rejected", "skipped"]
    finally:
        node.stop()


@pytest.mark.parametrize("served_eager", [True, False])
def test_the_grad_cam_overlay_goes_beside_the_report_as_a_secondary_capture(tmp_path, served_eager):
    """With secondary_capture on, an answer gets its Grad-CAM image in the film's study (a refusal none); a
    server without the eager archive gives no image, and the report is sent all the same."""
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    port = free_ports(1)[0]
    node = Node(NodeConfig(port=port, allow=("SENDER",), spool=str(tmp_path / "spool"), secondary_capture=True),
                connect=StandIn(down=-5, explains=served_eager).connect)
    node.start()
    try:
        answered = study_film(instance="1.2.826.0.1.3680043.10.9.5")
        assert send(port, [answered, study_film(PatientName="OUTSIDE^FILM")]) == [0, 0]
        wait_until_drained(node)
    finally:
        node.stop()
    written = [dcmread(path) for path in (tmp_path / "spool" / "reports").glob("*/*.dcm")]
    images = [report for report in written if report.SOPClassUID == SecondaryCaptureImageStorage]
    assert len(written) - len(images) == 2  # an SR each
    rows = {row["sop_uid"]: row for row in read_audit(tmp_path / "spool") if row["event"] == "done"}
    uids = json.loads(rows["1.2.826.0.1.3680043.10.9.5"]["result_uids"])
    if served_eager:
        [image] = images
        assert image.StudyInstanceUID == dcmread(io.BytesIO(answered)).StudyInstanceUID
        assert image.pixel_array.shape == (48, 64, 3) and image.SeriesNumber == 991
        assert image.SOPInstanceUID == uids["sc"] and "not for clinical use" in image.DerivationDescription
    else:
        assert not images and "Model not found" in uids["sc_not_made"]


def cut_off_sender(port: int, film: bytes, after_pdus: int) -> object:
    """A sender whose line goes dead after `after_pdus` P-DATA PDUs of `film`: its status (None: no answer)."""
    from pynetdicom import AE

    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
    assert assoc.is_established
    sent, send = [], assoc.dul.socket.send

    def dying(data: bytes) -> bool:
        if data[:1] == b"\x04":  # P-DATA-TF
            sent.append(len(data))
            if len(sent) > after_pdus:
                assoc.dul.socket.close()
                return False
        return send(data)

    assoc.dul.socket.send = dying
    try:
        status = assoc.send_c_store(dcmread(io.BytesIO(film)))
    finally:
        assoc.abort()
    return getattr(status, "Status", None)


@pytest.mark.parametrize("case", ["disconnect", "over the limit"])
def test_a_sender_gone_or_cut_off_mid_transfer_leaves_nothing_half_written(tmp_path, monkeypatch, case):
    """The line goes dead after two of a 3.6 MB film's PDUs, or the film is far over the node's limit (the
    node aborts while receiving): no partial file anywhere, nothing queued, the next film answered."""
    import tempfile

    from loadtest.dicom_films import fixture_pixels

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where pynetdicom puts a dataset while receiving
    port = free_ports(1)[0]
    limit = 200_000 if case == "over the limit" else 64 << 20
    node = Node(NodeConfig(port=port, allow=("SENDER",), spool=str(tmp_path / "spool"), max_bytes=limit),
                connect=StandIn(down=-5).connect)
    node.start()
    try:
        big = study_film(fixture_pixels(side=1900))
        assert cut_off_sender(port, big, after_pdus=2 if case == "disconnect" else 100) is None
        deadline = time.monotonic() + 10
        while any(scratch.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(scratch.iterdir())
        assert not any((tmp_path / "spool" / "incoming").iterdir()) and node.spool.waiting() == 0
        assert send(port, [study_film()]) == [0]
        wait_until_drained(node)
        rows = read_audit(tmp_path / "spool")
        assert [row["outcome"] for row in rows if row["event"] != "received"] == (
            ["answered"] if case == "disconnect" else ["rejected", "answered"])
        assert not any(scratch.iterdir())
    finally:
        node.stop()


def fixture_pixels_big():
    from loadtest.dicom_films import fixture_pixels

    return fixture_pixels(side=600)  # 360 kB of pixels: over the test's 200 kB limit


def test_make_dicom_node_starts_it_in_the_background_before_torchserve_and_make_stop_stops_it(tmp_path):
    import socket

    from cxr.dicom.node import main

    port = free_ports(1)[0]
    options = ["--workdir", str(tmp_path), "--allow", "ORTHANC", "--port", str(port), "--spool",
               str(tmp_path / "spool"), "--key-file", str(tmp_path / "no_torchserve_yet.json")]
    main(["start", *options])
    try:
        assert "DICOM node CXR on 127.0.0.1" in (tmp_path / "dicom-node.out").read_text()
        assert send(port, [study_film()], calling="ORTHANC") == [0]  # queued while TorchServe is not there
    finally:
        main(["stop", *options])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        raise AssertionError(f"port {port} still open")
    assert [row["outcome"] for row in read_audit(tmp_path / "spool", outcome="pending")] == [None]


def test_a_film_the_node_cannot_handle_is_recorded_as_failed_and_the_worker_goes_on(tmp_path):
    node = Node(NodeConfig(port=free_ports(1)[0], allow=("SENDER",), spool=str(tmp_path / "spool"), max_delay=0.1,
                           max_failures=2, workers=1), connect=StandIn().connect)
    node.spool.enqueue(write_film(tmp_path, "a.dcm"), "1.2.3.66", "SENDER", {})
    for queued in (tmp_path / "spool").glob("*.dcm"):
        queued.unlink()  # queued, then gone from the disk when its turn comes
    node.start()
    try:
        assert send(node.config.port, [study_film()]) == [0]
        wait_until_drained(node)
        outcomes = {row["sop_uid"]: row for row in read_audit(tmp_path / "spool") if row["event"] == "done"}
        assert outcomes["1.2.3.66"]["outcome"] == "failed" and '"attempts": 2' in outcomes["1.2.3.66"]["detail"]
        assert sorted(row["outcome"] for row in outcomes.values()) == ["answered", "failed"]
    finally:
        node.stop()


def test_cxr_dicom_node_and_cxr_audit_on_the_command_line(tmp_path, capsys):
    from cxr import cli

    args = cli.get_args_parser().parse_args(["dicom-node", "--allow", "ORTHANC,MODALITY", "--port", "11300",
                                             "--send-to", "ORTHANC@127.0.0.1:4242", "--models", "pneumonia,adult"])
    config = cli.node_config(args)
    assert config.port == 11300 and config.allow == ("ORTHANC", "MODALITY") and config.models == ("pneumonia", "adult")
    spool = Spool(tmp_path / "spool")
    spool.enqueue(write_film(tmp_path, "a.dcm", instance="1.2.3.5"), "1.2.3.5", "ORTHANC", {"study_uid": "7"})
    spool.close()
    assert cli.main(["audit", "--spool", str(tmp_path / "spool"), "--outcome", "pending"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert '"sop_uid": "1.2.3.5"' in line and '"calling_ae": "ORTHANC"' in line
    assert cli.main(["audit", "--spool", str(tmp_path / "nowhere")]) == 1
