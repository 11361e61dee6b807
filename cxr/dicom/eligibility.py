"""Which received instances are for a model: a single-frame frontal chest radiograph (CR or DX) in a transfer
syntax the stack decodes. Everything else is acknowledged to the sender and recorded as skipped, with the reason.

The view, in order: `ViewPosition` PA or AP is frontal, any other value (LL, RL, LATERAL...) is not; without it,
a series, protocol or study description naming a lateral view is not frontal, one naming PA, AP or frontal is;
with none of these the film is taken as frontal and the audit log says so ("frontal assumed").
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.uid import UID

RADIOGRAPH_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
# What pydicom decodes without plug-ins, less deflate (refused by the stack's decode limits: cxr_core.preprocessing)
DECODED_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
FRONTAL_VIEWS = ("PA", "AP")
LATERAL_WORDS = re.compile(r"\b(LAT|LATERAL|LL|RL)\b", re.I)
FRONTAL_WORDS = re.compile(r"\b(PA|AP|FRONTAL|P-A|A-P)\b", re.I)


def view(dataset: Dataset) -> tuple[bool, str]:
    """(frontal?, how that was decided), by the rule in the module docstring."""
    position = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if position:
        return position in FRONTAL_VIEWS, f"ViewPosition {position}"
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        text = str(dataset.get(keyword, "") or "")
        if LATERAL_WORDS.search(text):
            return False, f"{keyword} {text!r} names a lateral view"
        if FRONTAL_WORDS.search(text):
            return True, f"{keyword} {text!r} names a frontal view"
    return True, "frontal assumed (no ViewPosition, no view in the descriptions)"


def skip_reason(dataset: Dataset, transfer_syntax: str) -> str | None:
    """Why this instance is not for a model, or None when it is. Reads the header only (never the pixels)."""
    sop_class = str(dataset.get("SOPClassUID", ""))
    if sop_class not in RADIOGRAPH_CLASSES:
        name = UID(sop_class).name if sop_class else "none"
        return f"SOP class {sop_class or 'missing'} ({name}) is not a radiograph (CR or DX)"
    if "PixelData" not in dataset:
        return "no pixel data"
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        return f"{frames} frames: a single-frame film is expected"
    if transfer_syntax not in DECODED_SYNTAXES:
        return f"transfer syntax {transfer_syntax} ({UID(transfer_syntax).name}) is not one the stack decodes"
    body_part = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part != "CHEST":
        return f"body part {body_part}, not CHEST"
    frontal, how = view(dataset)
    if not frontal:
        return f"not a frontal view: {how}"
    return None
