"""Where the tests find their X-rays: the data root ($CXR_DATA, else ../shared/data) when it is there, else the
example X-rays committed in tests/fixtures/xrays/ for everything that only needs real chest X-rays to send."""

from pathlib import Path

import pytest

from cxr.data import image_files
from cxr.paths import EXAMPLE_XRAYS, data_root

REPO = Path(__file__).resolve().parent.parent
DATA = data_root()
SHIPPED_MODEL = REPO / "models" / "pneumonia" / "model.pt"
SHIPPED_CXR4 = REPO / "models" / "cxr4" / "model.pt"


def dataset(name: str) -> Path | None:
    """`name` (pneumonia, multiclass) under the data root, or None when it is not there."""
    root = DATA / name
    return root if (root / "train").is_dir() else None


def image_paths(folder: Path) -> list[Path]:
    return image_files(folder, "*/*")


def required_dataset(name: str) -> Path:
    """The data set's root, or a skip naming where it was looked for."""
    root = dataset(name)
    if root is None:
        pytest.skip(f"{name} X-rays not found at {DATA / name} (set CXR_DATA to the data root)")
    return root


@pytest.fixture(scope="session")
def pneumonia_data() -> Path:
    return required_dataset("pneumonia")


@pytest.fixture(scope="session")
def xray_tree(tmp_path_factory) -> Path:
    """An ImageFolder tree of real X-rays: the pneumonia data set, else train/val/test folders that each link
    to the example X-rays (for the tests that need real images, not the data set's figures)."""
    root = dataset("pneumonia")
    if root is not None:
        return root
    root = tmp_path_factory.mktemp("example-tree")
    for split in ("train", "val", "test"):
        for path in image_paths(EXAMPLE_XRAYS):
            (root / split / path.parent.name).mkdir(parents=True, exist_ok=True)
            (root / split / path.parent.name / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="session")
def multiclass_data() -> Path:
    return required_dataset("multiclass")


@pytest.fixture(scope="session")
def real_samples() -> list[Path]:
    """The 40 original-resolution sample X-rays, for the checks whose figures were measured on them."""
    paths = image_paths(DATA / "samples")
    if not paths:
        pytest.skip(f"sample X-rays not found under {DATA / 'samples'}")
    return paths


# The one sample X-ray that the shipped pneumonia model's population check flags (a larger, older-looking chest
# than the 1-5 year-olds of its training set: docs/model_cards/pneumonia.md); tests/test_population.py keeps
# this list true.
OUTSIDE_POPULATION_SAMPLES = ("IM-0045-0001.jpeg",)


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    """Real chest X-rays to send, all inside the shipped models' populations: the samples when the data root
    is there (less OUTSIDE_POPULATION_SAMPLES), else the 20 example X-rays."""
    return [path for path in image_paths(DATA / "samples") if path.name not in OUTSIDE_POPULATION_SAMPLES] \
        or image_paths(EXAMPLE_XRAYS)


# A real TorchServe shared by every integration test module (started once per session, stopped at its end).
from tests.serving_support import served  # noqa: E402,F401
