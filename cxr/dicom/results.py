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
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.valuerep import DS

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


Concept = tuple[str, str, str]  # code value, coding scheme, meaning
UNITLESS: Concept = ("1", "UCUM", "no units")


def _local(value: str, meaning: str | None = None) -> Concept:
    """A concept of the private scheme: the finding and the model's own values."""
    return value[:16], SCHEME, (meaning or value)[:64]


def _content(source: Dataset | None, result: Result, part: str) -> list[tuple[str, Concept, Any]]:
    """The SR's content items of one part, as (value type, concept name, value): `model` (which model), `film`
    (the film and what was found in it, or why nothing was) or `closing` (the disclaimer)."""
    if part == "model":
        return [("TEXT", ("111001", "DCM", "Algorithm Name"), result.model),
                ("TEXT", ("111003", "DCM", "Algorithm Version"), result.version or "unknown")]
    if part == "closing":
        return [("TEXT", _local("DISCLAIMER", "Disclaimer"), DISCLAIMER)]
    assert source is not None
    items: list[tuple[str, Concept, Any]] = [("IMAGE", ("121112", "DCM", "Source of Measurement"),
                                              (str(source.SOPClassUID), str(source.SOPInstanceUID)))]
    if result.refusal:
        items.append(("TEXT", ("121073", "DCM", "Impression"), result.summary()[:1024]))
    else:
        items.append(("CODE", ("121071", "DCM", "Finding"), _local(str(result.label))))
        items += [("NUM", _local(f"P {name}", f"Probability of {name}"), round(float(p), 6))
                  for name, p in result.probabilities.items()]
        if result.threshold is not None:
            items.append(("NUM", _local("THRESHOLD", "Decision threshold"), float(result.threshold)))
    return items + [("TEXT", _local("GATE", "Chest X-ray gate"), json.dumps(result.gate)[:1024]),
                    ("TEXT", _local("POPULATION", "Population check"), json.dumps(result.population)[:1024])]


def _highdicom_item(kind: str, name: Concept, value: Any) -> Dataset:
    """One content item as highdicom builds it."""
    from highdicom.sr import (
        CodeContentItem,
        CodedConcept,
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )

    concept, contains = CodedConcept(*name), RelationshipTypeValues.CONTAINS
    if kind == "TEXT":
        return TextContentItem(name=concept, value=value, relationship_type=contains)
    if kind == "CODE":
        return CodeContentItem(name=concept, value=CodedConcept(*value), relationship_type=contains)
    if kind == "NUM":
        return NumContentItem(name=concept, value=value, unit=CodedConcept(*UNITLESS), relationship_type=contains)
    return ImageContentItem(name=concept, referenced_sop_class_uid=value[0], referenced_sop_instance_uid=value[1],
                            relationship_type=contains)


def highdicom_report(source: Dataset, result: Result) -> Dataset:
    """The Comprehensive SR for `result` in the source's study, referencing the source instance, as highdicom
    builds it (with its checks: about 30 ms a film)."""
    from highdicom.sr import CodedConcept, ComprehensiveSR, ContainerContentItem

    root = ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = [_highdicom_item(*item) for part in ("model", "film", "closing")
                            for item in _content(source, result, part)]
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


_templates: dict[tuple, _Template] = {}


class _Skeleton(NamedTuple):
    """A frozen content item without its value; for a number, also its measured-value item without the number."""

    item: Dataset
    measured: Dataset | None


_skeletons: dict[tuple, _Skeleton] = {}  # by value type and concept (and the code, for a CODE item)
VALUE_KEYWORDS = {"TEXT": "TextValue", "NUM": "MeasuredValueSequence", "IMAGE": "ReferencedSOPSequence"}
STAND_INS = {"TEXT": "-", "NUM": 0.0, "IMAGE": ("1.2", "1.2")}


def structured_report(source: Dataset, result: Result) -> Dataset:
    """The Comprehensive SR for `result`: byte for byte `highdicom_report` but for the times it was made, built and
    encoded in about a tenth of the time: what every film of a model shares (the document attributes, each kind
    of content item) is built and encoded once, with highdicom; a film adds its own values."""
    if not (result.model + result.version).isascii():  # in the frozen series description: ASCII only
        return highdicom_report(source, result)
    key = (result.model, result.version, tuple(keyword for keyword in EVIDENCE_ATTRIBUTES if keyword in source))
    template, uids = _templates.get(key), result.uids(source)
    if template is None:  # worker threads may both build one: the same template either way
        if len(_templates) >= 256:
            _templates.clear()
        first = highdicom_report(source, result)
        template = _templates[key] = _Template(first, _frozen(_copy(first, PER_FILM)))
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
    report.ContentSequence = [_fast_item(*item) for part in ("model", "film", "closing")
                              for item in _content(source, result, part)]
    charset = report.get("SpecificCharacterSet")
    return _as_frozen(report, convert_encodings(charset) if charset else default_encoding)


def _fast_item(kind: str, name: Concept, value: Any) -> Dataset:
    """One content item: a copy of the frozen one of its value type and concept (built by highdicom once) with this
    item's value. A concept outside ASCII is built by highdicom (frozen parts are ASCII only)."""
    if not "".join((*name, *(value if kind == "CODE" else ()))).isascii():
        return _highdicom_item(kind, name, value)
    key = (kind, name, value if kind == "CODE" else None)
    skeleton = _skeletons.get(key)
    if skeleton is None:  # parsed as far as it is used here before threads share it: never converted after
        item = _frozen(_highdicom_item(kind, name, STAND_INS.get(kind, value)))
        measured = None
        if kind == "NUM":
            measured = _copy(item.MeasuredValueSequence[0], ("NumericValue", "FloatingPointValue"))
        if len(_skeletons) >= 4096:
            _skeletons.clear()
        skeleton = _skeletons[key] = _Skeleton(_copy(item, (VALUE_KEYWORDS.get(kind, ""),)), measured)
    item = _as_frozen(_copy(skeleton.item, ()))
    if kind == "TEXT":
        item.TextValue = value
    elif kind == "IMAGE":
        item.ReferencedSOPSequence = [_referenced(ReferencedSOPClassUID=value[0], ReferencedSOPInstanceUID=value[1])]
    elif kind == "NUM":  # a number as highdicom writes one: decimal string and, for a float, the float itself
        measured = _as_frozen(_copy(skeleton.measured, ()))
        measured.NumericValue = DS(value, auto_format=True)
        if isinstance(value, float):
            measured.FloatingPointValue = value
        item.MeasuredValueSequence = [measured]
    return item


def _as_frozen(dataset: Dataset, encoding: str | list[str] = default_encoding) -> Dataset:
    """Say `dataset` is encoded as its frozen parts are (explicit VR little endian, its character set): pydicom
    then writes those as the bytes they are instead of decoding them again. An item's own character set is
    pydicom's default (its text is written in the report's: the frozen parts are ASCII)."""
    dataset.set_original_encoding(False, True, encoding)
    return dataset


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
