"""What a stand-in TorchServe answers in the DICOM tests, a film's dataset as the node receives it, and a sender."""

from __future__ import annotations

import io
import time

from pydicom import dcmread

from cxr.dicom.node import Node
from loadtest.dicom_films import study_film

ANSWER = {"model": "pneumonia", "version": "1.0", "label": "PNEUMONIA", "probabilities": {"NORMAL": 0.2,
          "PNEUMONIA": 0.8}, "threshold": 0.4, "gate": {"ran": True, "score": 0.1, "limit": 0.8},
          "population": {"inside": True, "score": 0.2, "limit": 0.88, "check": "logistic"}}
REFUSAL = (422, "outside the model's population", {"population": {"inside": False}, "intended_population":
                                                    "children aged 1-5", "model_card": "docs/model_cards/x.md"})


def header(**options) -> tuple:
    dataset = dcmread(io.BytesIO(study_film(**options)))
    return dataset, str(dataset.file_meta.TransferSyntaxUID)


def send(port: int, films: list[bytes], calling: str = "SENDER") -> list[int | None]:
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR")
    if not assoc.is_established:
        return [None] * len(films)
    try:
        return [getattr(assoc.send_c_store(dcmread(io.BytesIO(film))), "Status", None) for film in films]
    finally:
        assoc.release()


def wait_until_drained(node: Node, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while node.spool.waiting() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.spool.waiting() == 0
