import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("CXR_DATA") or REPO.parent / "shared" / "data" / "pneumonia").resolve()
SHARED_DATA = DATA_ROOT.parent
SHIPPED_MODEL = REPO / "models" / "pneumonia" / "model.pt"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "train").is_dir():
        pytest.skip(f"real X-rays not found at {DATA_ROOT} (set CXR_DATA to an ImageFolder root)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    samples = SHARED_DATA / "samples"
    paths = sorted(samples.glob("*/*.jpeg"))
    if not paths:
        pytest.skip(f"sample X-rays not found under {samples}")
    return paths


# A real TorchServe shared by every integration test module (started once per session, stopped at its end).
from tests.serving_support import served  # noqa: E402,F401
