"""The DICOM node end to end with a real PACS (Orthanc) and a real TorchServe: a study uploaded to Orthanc and
sent by it reaches the node, and the SR appears in Orthanc in the same study, with the right references and the
finding TorchServe gives for the same film, and its Grad-CAM image beside it; pynetdicom as the sender too."""

from __future__ import annotations

import io
import socket
import time

import pytest
from pydicom import dcmread

from cxr.dicom.config import NodeConfig
from cxr.dicom.node import Node
from cxr.dicom.spool import read_audit
from cxr.server import free_ports
from loadtest.dicom_films import fixture_pixels, study_film
from loadtest.pacs import Orthanc, PacsMissing
from tests.dicom_support import send, wait_until_drained

pytestmark = pytest.mark.integration
STUDY = "1.2.826.0.1.3680043.10.2.7"


@pytest.fixture
def pacs_and_node(served, tmp_path):
    node_port = free_ports(1)[0]
    try:
        pacs = Orthanc(tmp_path / "orthanc", "CXR", node_port)
    except PacsMissing as missing:
        pytest.skip(str(missing))
    config = NodeConfig(port=node_port, allow=("ORTHANC", "MODALITY"), send_to=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
                        spool=str(tmp_path / "spool"), fhir_dir=str(tmp_path / "fhir"),
                        key_file=str(served.workdir / "key_file.json"), inference_port=served.ports["inference"],
                        management_port=served.ports["management"], max_delay=1.0, secondary_capture=True)
    node = Node(config)
    node.start()
    try:
        yield pacs, node
    finally:
        node.stop()
        pacs.stop()
        for port in (node_port, pacs.http_port, pacs.dicom_port):
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


def sr_items(report) -> dict:
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in report.ContentSequence}


def wait_for_reports(pacs: Orthanc, study_id: str, count: int, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pacs.study_instances(study_id, modality="SR")
        if len(found) >= count:
            return [dcmread(io.BytesIO(pacs.file(item["ID"]))) for item in found]
        time.sleep(0.5)
    raise AssertionError(f"{count} SR(s) expected in the study; found {len(pacs.study_instances(study_id, 'SR'))}")


def test_a_study_sent_by_orthanc_gets_its_report_in_the_same_study(served, pacs_and_node):
    pacs, node = pacs_and_node
    frontal = study_film(fixture_pixels(12), study=STUDY, series=f"{STUDY}.1", instance=f"{STUDY}.1.1")
    lateral = study_film(fixture_pixels(13), study=STUDY, series=f"{STUDY}.2", instance=f"{STUDY}.2.1", view="LL")
    study_id = pacs.upload(frontal)["ParentStudy"]
    pacs.upload(lateral)
    pacs.send(study_id)
    wait_until_drained(node, timeout=120)
    [report] = wait_for_reports(pacs, study_id, 1)
    expected = served.predict(frontal)[1]  # the same film straight to TorchServe
    items = sr_items(report)
    assert report.StudyInstanceUID == STUDY and report.PatientID == "CXR-TEST-1"
    assert items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == f"{STUDY}.1.1"
    assert items["Finding"].ConceptCodeSequence[0].CodeValue == expected["label"]
    probability = float(items[f"Probability of {expected['label']}"].MeasuredValueSequence[0].NumericValue)
    assert probability == pytest.approx(expected["probabilities"][expected["label"]], abs=1e-5)
    assert items["Algorithm Version"].TextValue == expected["version"]
    [image] = pacs.study_instances(study_id, modality="OT")  # the Grad-CAM overlay, from pneumonia_eager
    assert dcmread(io.BytesIO(pacs.file(image["ID"]))).SeriesDescription.endswith("Grad-CAM")
    outcomes = {row["sop_uid"]: row["outcome"] for row in read_audit(node.config.spool) if row["event"] == "done"}
    assert outcomes == {f"{STUDY}.1.1": "answered", f"{STUDY}.2.1": "skipped"}
    pacs.send(study_id)  # sent again: the node answers nothing twice, the PACS holds one report
    wait_until_drained(node)
    time.sleep(1)
    assert len(pacs.study_instances(study_id, modality="SR")) == 1


def test_pynetdicom_as_the_sender_and_a_refusal_reported_as_such(served, pacs_and_node):
    pacs, node = pacs_and_node
    film = study_film(fixture_pixels(3), study=f"{STUDY}.9", series=f"{STUDY}.9.1", instance=f"{STUDY}.9.1.1")
    blank = study_film(fixture_pixels(3) * 0, study=f"{STUDY}.9", series=f"{STUDY}.9.1", instance=f"{STUDY}.9.1.2")
    assert send(node.config.port, [film, blank], calling="MODALITY") == [0, 0]
    wait_until_drained(node, timeout=120)
    [study] = [s for s in pacs.get("/studies") if pacs.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
               == f"{STUDY}.9"]
    reports = wait_for_reports(pacs, study, 2)
    by_source = {sr_items(r)["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID: r
                 for r in reports}
    refused = sr_items(by_source[f"{STUDY}.9.1.2"])  # a blank film: not a chest X-ray, refused by the gate
    assert "Finding" not in refused and "did not answer" in refused["Impression"].TextValue
    assert "Finding" in sr_items(by_source[f"{STUDY}.9.1.1"])


def test_the_node_over_grpc_gives_the_rest_answer(served, tmp_path):
    """protocol = "grpc": the same client the CLI uses, over TorchServe's gRPC port; the SR kept on disk (no
    destination) states what REST answers for the same film."""
    film = study_film(fixture_pixels(5), study=f"{STUDY}.5", series=f"{STUDY}.5.1", instance=f"{STUDY}.5.1.1")
    config = NodeConfig(port=free_ports(1)[0], allow=("MODALITY",), spool=str(tmp_path / "spool"), protocol="grpc",
                        key_file=str(served.workdir / "key_file.json"), grpc_port=served.ports["grpc_inference"],
                        management_port=served.ports["management"], max_delay=1.0)
    node = Node(config)
    node.start()
    try:
        assert send(config.port, [film], calling="MODALITY") == [0]
        wait_until_drained(node, timeout=120)
    finally:
        node.stop()
    [path] = (tmp_path / "spool" / "reports" / f"{STUDY}.5").glob("*.dcm")
    items = sr_items(dcmread(path))
    expected = served.predict(film)[1]
    assert items["Finding"].ConceptCodeSequence[0].CodeValue == expected["label"]
    probability = float(items[f"Probability of {expected['label']}"].MeasuredValueSequence[0].NumericValue)
    assert probability == pytest.approx(expected["probabilities"][expected["label"]], abs=1e-5)
