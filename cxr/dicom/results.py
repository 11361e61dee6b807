"""What the node answers for one instance and one model: a DICOM Comprehensive SR and a FHIR R4 DiagnosticReport
with its Observation, both from the same `Result`.

Why a Comprehensive SR and not TID 1500 (Measurement Report): TID 1500 is built for measurements on regions
(ROIs, tracking identifiers, measurement groups); this answer is one finding for a whole film with its
probability, or a refusal, with the model that gave it. A plain report tree (finding, probabilities, threshold,
model, gate, population, disclaimer) says exactly that, and every viewer that shows SR shows it as text.

Codes: the finding and the model's own values use a private coding scheme (`99CXR`, the label itself): a model's
class names are not SNOMED concepts, and a wrong standard code would be worse than an honest local one.

UIDs are derived (2.25 + 128 bits of a SHA-256) from the source SOP Instance UID, the model and its version: a
retry, a restart or a second delivery of the same film never makes a second report, it replaces the first.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

DISCLAIMER = "Research tool, not for clinical use: a machine reading aid, not a diagnosis."
SCHEME = "99CXR"
MANUFACTURER = "cxr serving stack (open source)"


def derived_uid(*parts: str) -> str:
    """A DICOM UID (2.25 form, at most 44 characters) that depends only on `parts`."""
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True)
class Result:
    """One model's answer for one source instance, or its refusal (`refusal` set, `label` None)."""

    model: str
    version: str
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    population: dict[str, Any] = field(default_factory=dict)
    refusal: dict[str, Any] | None = None  # {"code", "error", and the refusal's other fields}

    @classmethod
    def from_answer(cls, model: str, answer: dict[str, Any]) -> Result:
        return cls(model=answer.get("model", model), version=str(answer.get("version", "")), label=answer["label"],
                   probabilities=answer.get("probabilities", {}), threshold=answer.get("threshold"),
                   gate=answer.get("gate", {}), population=answer.get("population", {}))

    @classmethod
    def from_refusal(cls, model: str, version: str, status: int, message: str, details: dict[str, Any]) -> Result:
        return cls(model=model, version=version, population=details.get("population", {}),
                   refusal={"code": status, "error": message, **details})

    @property
    def outcome(self) -> str:
        return "refused" if self.refusal else "answered"

    def summary(self) -> str:
        """One line: the finding and its probability, or why there is none."""
        if self.refusal:
            whom = self.refusal.get("intended_population")
            return (f"No finding: the model did not answer ({self.refusal['code']} {self.refusal['error']})"
                    + (f". The model is for: {whom}" if whom else ""))
        probability = self.probabilities.get(self.label, float("nan"))
        return f"{self.label} (probability {probability:.3f})"

    def uids(self, source: Dataset) -> dict[str, str]:
        """The SR's and the Grad-CAM image's series and instance UIDs and the FHIR ids, from the source instance
        and the model."""
        instance = str(source.SOPInstanceUID)
        return {"series": derived_uid(str(source.StudyInstanceUID), self.model, self.version, "sr-series"),
                "sr": derived_uid(instance, self.model, self.version, "sr"),
                "sc_series": derived_uid(str(source.StudyInstanceUID), self.model, self.version, "sc-series"),
                "sc": derived_uid(instance, self.model, self.version, "sc"),
                "report": derived_uid(instance, self.model, self.version, "fhir-report").replace(".", "-")[:64],
                "observation": derived_uid(instance, self.model, self.version, "fhir-obs").replace(".", "-")[:64]}


# What the SR copies from the film (patient and study modules) and references (series, instance): a film's
# header trimmed to these makes highdicom's evidence handling twice as fast.
COPIED_ATTRIBUTES = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                     "PatientSex", "PatientAge", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                     "AccessionNumber", "ReferringPhysicianName", "StudyDescription")
# Type 2 in the SR (present, maybe empty): highdicom reads them from the evidence, so a film without one (an
# anonymised film without a birth date) gets it empty.
EMPTY_IF_MISSING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime")
EVIDENCE_ATTRIBUTES = (*COPIED_ATTRIBUTES, "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def evidence_of(source: Dataset) -> Dataset:
    evidence = Dataset()
    for keyword in EVIDENCE_ATTRIBUTES:
        if keyword in source or keyword in EMPTY_IF_MISSING:
            setattr(evidence, keyword, source.get(keyword))
    return evidence


def _code(value: str, meaning: str | None = None):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value[:16], scheme_designator=SCHEME, meaning=(meaning or value)[:64])


def _items(source: Dataset | None, result: Result, part: str) -> list:
    """The SR's content items of one part: `model` (which model), `film` (the film and what was found in it, or
    why nothing was) or `closing` (the disclaimer). The model and closing parts are the same for every film."""
    from highdicom.sr import (
        CodeContentItem,
        CodedConcept,
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    if part == "model":
        return [TextContentItem(name=CodedConcept("111001", "DCM", "Algorithm Name"), value=result.model,
                                relationship_type=contains),
                TextContentItem(name=CodedConcept("111003", "DCM", "Algorithm Version"),
                                value=result.version or "unknown", relationship_type=contains)]
    if part == "closing":
        return [TextContentItem(name=_code("DISCLAIMER", "Disclaimer"), value=DISCLAIMER, relationship_type=contains)]
    unitless = CodedConcept("1", "UCUM", "no units")
    items = [ImageContentItem(name=CodedConcept("121112", "DCM", "Source of Measurement"),
                              referenced_sop_class_uid=str(source.SOPClassUID),
                              referenced_sop_instance_uid=str(source.SOPInstanceUID), relationship_type=contains)]
    if result.refusal:
        items.append(TextContentItem(name=codes.DCM.Impression, value=result.summary()[:1024],
                                     relationship_type=contains))
    else:
        items.append(CodeContentItem(name=codes.DCM.Finding, value=_code(result.label), relationship_type=contains))
        items += [NumContentItem(name=_code(f"P {name}", f"Probability of {name}"), value=round(float(p), 6),
                                 unit=unitless, relationship_type=contains)
                  for name, p in result.probabilities.items()]
        if result.threshold is not None:
            items.append(NumContentItem(name=_code("THRESHOLD", "Decision threshold"), value=float(result.threshold),
                                        unit=unitless, relationship_type=contains))
    return items + [TextContentItem(name=_code("GATE", "Chest X-ray gate"), value=json.dumps(result.gate)[:1024],
                                    relationship_type=contains),
                    TextContentItem(name=_code("POPULATION", "Population check"),
                                    value=json.dumps(result.population)[:1024], relationship_type=contains)]


def highdicom_report(source: Dataset, result: Result) -> Dataset:
    """The Comprehensive SR for `result` in the source's study, referencing the source instance, as highdicom
    builds it (with its checks: about 30 ms a film)."""
    from highdicom.sr import CodedConcept, ComprehensiveSR, ContainerContentItem

    root = ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = [*_items(None, result, "model"), *_items(source, result, "film"),
                            *_items(None, result, "closing")]
    uids = result.uids(source)
    return ComprehensiveSR(evidence=[evidence_of(source)], content=root, series_instance_uid=uids["series"],
                           series_number=990, sop_instance_uid=uids["sr"], instance_number=1, manufacturer=MANUFACTURER,
                           is_complete=True, series_description=f"CXR AI {result.model} {result.version}"[:64])


# Per film, the document attributes that change: the film's own (copied or referenced), the SR's UIDs and times.
PER_FILM = (*COPIED_ATTRIBUTES, "SeriesInstanceUID", "SOPInstanceUID", "InstanceCreationDate", "InstanceCreationTime",
            "ContentDate", "ContentTime",
            "ContributingEquipmentSequence", "CurrentRequestedProcedureEvidenceSequence", "ContentSequence")


@dataclass(frozen=True)
class _Template:
    """What a model's reports share, from the first one highdicom built: encoded once (`_frozen`)."""

    report: Dataset  # that first report
    document: Dataset  # its attributes that are the same for every film
    model_items: list[Dataset]
    closing_items: list[Dataset]


_templates: dict[tuple, _Template] = {}


def structured_report(source: Dataset, result: Result) -> Dataset:
    """The Comprehensive SR for `result`: byte for byte `highdicom_report` but for the times it was made, in a
    fifth of the time: the parts every film of a model shares are built and encoded once, with highdicom."""
    key = (result.model, result.version, tuple(keyword for keyword in EVIDENCE_ATTRIBUTES if keyword in source))
    template, uids = _templates.get(key), result.uids(source)
    if template is None:  # worker threads may both build one: the same template either way
        if len(_templates) >= 256:
            _templates.clear()
        first = highdicom_report(source, result)
        template = _templates[key] = _Template(first, _frozen(_copy(first, PER_FILM)),
                                               [_frozen(item) for item in _items(None, result, "model")],
                                               [_frozen(item) for item in _items(None, result, "closing")])
    report = _copy(template.document, ())
    report.file_meta = _copy(template.report.file_meta, ("MediaStorageSOPInstanceUID",), FileMetaDataset())
    report.file_meta.MediaStorageSOPInstanceUID = uids["sr"]
    for keyword in COPIED_ATTRIBUTES:
        if keyword in template.report:
            setattr(report, keyword, source.get(keyword))
    report.SeriesInstanceUID, report.SOPInstanceUID = uids["series"], uids["sr"]
    now = datetime.now()
    report.InstanceCreationDate = report.ContentDate = now.strftime("%Y%m%d")
    report.InstanceCreationTime = report.ContentTime = now.strftime("%H%M%S.%f")
    equipment = _copy(template.report.ContributingEquipmentSequence[0], ("ContributionDateTime",))
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f")
    report.ContributingEquipmentSequence = [equipment]
    report.CurrentRequestedProcedureEvidenceSequence = [_referenced(
        StudyInstanceUID=source.StudyInstanceUID, ReferencedSeriesSequence=[_referenced(
            SeriesInstanceUID=source.SeriesInstanceUID, ReferencedSOPSequence=[_referenced(
                ReferencedSOPClassUID=source.SOPClassUID, ReferencedSOPInstanceUID=source.SOPInstanceUID)])])]
    report.ContentSequence = [*template.model_items, *_items(source, result, "film"), *template.closing_items]
    charset = report.get("SpecificCharacterSet")
    # Encoded as its frozen parts were: pydicom then writes those as the bytes they are instead of decoding them
    # again (a third of the time it takes to encode the report).
    report.set_original_encoding(False, True, convert_encodings(charset) if charset else default_encoding)
    return report


def _frozen(dataset: Dataset) -> Dataset:
    """`dataset` encoded (explicit VR little endian) and read back unparsed: pydicom writes such elements as the
    bytes they are, not element by element again. Only for ASCII values (the same bytes in any character set)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return read_dataset(io.BytesIO(buffer.getvalue()), is_implicit_VR=False, is_little_endian=True)


def _copy(dataset: Dataset, leave_out: tuple[str, ...], into: Dataset | None = None) -> Dataset:
    """A new dataset holding `dataset`'s elements but those left out; the elements are shared, so the caller
    sets new values only on the attributes it left out (a new element each), never on the others."""
    copied = Dataset() if into is None else into
    for tag in dataset.keys():
        element = dataset.get_item(tag)  # as it is: an unparsed element stays unparsed
        if keyword_for_tag(tag) not in leave_out:
            copied[tag] = element
    return copied


def _referenced(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def secondary_capture(source: Dataset, result: Result, overlay_png: str) -> Dataset:
    """The Grad-CAM overlay (base64 PNG, as TorchServe's explanations answer) as a Secondary Capture image in the
    film's study, a series of its own (number 991); oriented as the film (PA by default: L, F)."""
    from highdicom import PhotometricInterpretationValues
    from highdicom.sc import SCImage
    from pydicom.uid import ExplicitVRLittleEndian

    with Image.open(io.BytesIO(base64.b64decode(overlay_png))) as image:
        pixels = np.asarray(image.convert("RGB"))
    orientation = source.get("PatientOrientation")
    uids = result.uids(source)
    image = SCImage.from_ref_dataset(
        evidence_of(source), pixels, PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=uids["sc_series"], series_number=991,
        sop_instance_uid=uids["sc"], instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=tuple(orientation) if orientation is not None and len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian)
    image.SeriesDescription = f"CXR AI {result.model} {result.version} Grad-CAM"[:64]
    image.DerivationDescription = (f"Grad-CAM of {result.label} over the image the model saw. {DISCLAIMER}")[:1024]
    image.BurnedInAnnotation = "NO"
    return image


def fhir_report(source: Dataset, result: Result, sha256: str) -> dict[str, Any]:
    """The FHIR R4 DiagnosticReport (with its Observation contained) for `result`, as JSON-ready dict."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    uids = result.uids(source)
    now = datetime.now(UTC).isoformat()
    observation: dict[str, Any] = {
        "resourceType": "Observation", "id": uids["observation"], "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging report"}],
                 "text": f"{result.model} {result.version}"},
        "derivedFrom": [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{source.SOPInstanceUID}"}}],
        "device": {"display": f"{result.model} {result.version} ({MANUFACTURER})"},
        "note": [{"text": DISCLAIMER}],
    }
    if result.refusal:
        observation["dataAbsentReason"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "not-performed",
            "display": "Not Performed"}], "text": result.summary()}
    else:
        observation["valueCodeableConcept"] = {"coding": [{"system": f"urn:cxr:{result.model}:labels",
                                                            "code": result.label}], "text": result.label}
        observation["component"] = [{"code": {"text": f"probability {name}"},
                                     "valueQuantity": {"value": round(float(p), 6), "unit": "1"}}
                                    for name, p in result.probabilities.items()]
    report = DiagnosticReport(**{
        "resourceType": "DiagnosticReport", "id": uids["report"], "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging report"}]},
        "issued": now, "conclusion": result.summary(), "contained": [observation],
        "result": [{"reference": f"#{uids['observation']}"}],
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uids['sr']}"},
                       {"system": "urn:sha256:pixel-data", "value": sha256}],
        "imagingStudy": [], "subject": {"identifier": {"value": str(source.get("PatientID", ""))}},
    })
    return json.loads(report.json())
