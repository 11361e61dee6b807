"""Where the data and the example X-rays are: one meaning of `CXR_DATA` for every command (no torch import, so
the client starts fast)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A handful of downsized Kermany test X-rays committed with the code (tests/fixtures/xrays/README.md), so the examples
# and the serving tests run where the data root is absent.
EXAMPLE_XRAYS = REPO / "tests" / "fixtures" / "xrays"
# The shipped "not a chest X-ray" gate (cxr_core.gate), packed into every archive.
SHIPPED_GATE = REPO / "models" / "gate" / "ood_gate.pt"


def data_root() -> Path:
    """The folder holding `pneumonia/`, `multiclass/` and `samples/`: `$CXR_DATA`, else `../shared/data` next to
    the repository (wherever the command runs from)."""
    root = Path(os.environ.get("CXR_DATA") or REPO.parent / "shared" / "data").resolve()
    if (root / "train").is_dir() and not (root / "pneumonia").is_dir():
        raise ValueError(f"CXR_DATA={root} is one data set's split folder; CXR_DATA names the data root that "
                         "holds pneumonia/, multiclass/ and samples/ (pass a single data set with --data)")
    return root


def samples_dir() -> Path:
    """The 40 original-resolution sample X-rays under the data root, else the committed example X-rays."""
    samples = data_root() / "samples"
    return samples if samples.is_dir() else EXAMPLE_XRAYS
