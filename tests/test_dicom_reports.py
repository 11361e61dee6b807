"""What the DICOM node makes of a film without a network: which films are for a model, and the SR and FHIR
documents it writes for an answer or a refusal."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread

from cxr.dicom.eligibility import skip_reason
from cxr.dicom.results import Result, derived_uid, fhir_report, highdicom_report, structured_report
from tests.dicom_support import ANSWER, REFUSAL, header


@pytest.mark.parametrize(("options", "reason"), [
    ({}, None),
    ({"view": "AP"}, None),
    ({"view": "LL"}, "not a frontal view: ViewPosition LL"),
    ({"view": "", "SeriesDescription": "Chest LAT"}, "names a lateral view"),
    ({"view": "", "SeriesDescription": "Thorax"}, None),  # frontal assumed, said in the audit log
    ({"BodyPartExamined": "KNEE"}, "body part KNEE"),
    ({"frames": 2}, "2 frames"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, "is not a radiograph"),
])
def test_which_films_are_for_a_model(options, reason):
    found = skip_reason(*header(**options))
    assert found is None if reason is None else reason in found


def test_the_report_references_the_film_and_says_the_finding():
    source, _ = header()
    report = structured_report(source, Result.from_answer("pneumonia", ANSWER))
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.PatientID == source.PatientID
    assert report.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in report.ContentSequence}
    assert items["Finding"].ConceptCodeSequence[0].CodeValue == "PNEUMONIA"
    assert float(items["Probability of PNEUMONIA"].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.8)
    assert items["Algorithm Name"].TextValue == "pneumonia" and items["Algorithm Version"].TextValue == "1.0"
    assert "not for clinical use" in items["Disclaimer"].TextValue
    assert items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    again = structured_report(source, Result.from_answer("pneumonia", ANSWER))
    assert again.SOPInstanceUID == report.SOPInstanceUID  # a retry replaces, never duplicates
    other = structured_report(source, Result.from_answer("pneumonia", {**ANSWER, "version": "2.0"}))
    assert other.SOPInstanceUID != report.SOPInstanceUID
    assert len(derived_uid("x")) <= 64


def written(report) -> bytes:
    """The report as stored, but for the times it was made (creation, content and contribution)."""
    report = dcmread(io.BytesIO(_saved(report)))
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"):
        delattr(report, keyword)
    del report.ContributingEquipmentSequence[0].ContributionDateTime
    return _saved(report)


def _saved(report) -> bytes:
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Failed to encode value")  # "–" in a film without a character set: "?" in both
def test_the_fast_report_is_the_one_highdicom_builds():
    """Reports are made from the first of their kind with each film's values: byte for byte what highdicom makes,
    for other patients, studies, a missing attribute, answers and refusals, text outside ASCII, and the first
    report left unchanged."""
    first, _ = header()
    made_first = written(structured_report(first, Result.from_answer("pneumonia", ANSWER)))
    films = [first, header(study="1.2.3.4", series="1.2.3.4.5", PatientName="OTHER^ONE", PatientID="P2",
                           AccessionNumber="B7", StudyDescription="CHEST PA")[0],
             header(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen")[0]]
    without_birth_date, _ = header()
    del without_birth_date.PatientBirthDate
    for source in [*films, without_birth_date]:
        for result in (Result.from_answer("pneumonia", ANSWER), Result.from_refusal("pneumonia", "1.0", *REFUSAL),
                       Result.from_answer("pneumonia", {**ANSWER, "label": "NORMAL", "threshold": None}),
                       Result.from_answer("pneumonia", {**ANSWER, "label": "ÖDEM", "probabilities": {"ÖDEM": 0.7}}),
                       Result.from_refusal("pneumonia", "1.0", 422, "outside", {"intended_population": "Kinder 1–5"}),
                       Result.from_answer("pneumonia", {**ANSWER, "model": "lunge-ü"})):
            assert written(structured_report(source, result)) == written(highdicom_report(source, result))
    assert written(structured_report(first, Result.from_answer("pneumonia", ANSWER))) == made_first


def test_the_fast_report_writes_its_frozen_parts_as_the_bytes_they_are():
    """Encoding a report leaves the parts it shares with other reports as bytes (decoding them again for every
    film would cost more than building the report), with and without the film's character set."""
    for source in (header()[0], header(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen")[0]):
        report = structured_report(source, Result.from_answer("pneumonia", ANSWER))
        _saved(report)
        assert report.get_item(0x00080070).is_raw  # Manufacturer, from the first report
        assert all(item.get_item(0x0040A040).is_raw for item in report.ContentSequence)  # each item's ValueType


def test_a_refusal_is_reported_as_such_never_as_a_negative_finding():
    source, _ = header()
    result = Result.from_refusal("pneumonia", "1.0", *REFUSAL)
    report = structured_report(source, result)
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in report.ContentSequence]
    assert "Finding" not in names and "Impression" in names
    impression = report.ContentSequence[names.index("Impression")].TextValue
    assert "did not answer" in impression and "children aged 1-5" in impression
    document = fhir_report(source, result, "ab" * 32)
    observation = document["contained"][0]
    assert "valueCodeableConcept" not in observation and observation["dataAbsentReason"]["coding"][0]["code"]
    answered = fhir_report(source, Result.from_answer("pneumonia", ANSWER), "ab" * 32)
    assert answered["contained"][0]["valueCodeableConcept"]["text"] == "PNEUMONIA"
    assert answered["resourceType"] == "DiagnosticReport" and answered["status"] == "final"
