"""A fake TorchServe context, tiny model files and images their population check tells apart, so the handler
runs without a server."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxr.paths import EXAMPLE_XRAYS
from cxr_core.checkpoint import ServingConfig, model_from_checkpoint, save_checkpoint
from cxr_core.models import build_model
from cxr_core.population import resnet_forward
from cxr_core.preprocessing import EvalPreset, PreprocessConfig

OTHER_SOURCES = EXAMPLE_XRAYS.parent / "other_sources"  # films of other kinds, for the population check


class RecordingMetrics:
    """Stands in for TorchServe's metrics cache: remembers (method, name, value, dimensions)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict[str, str]]] = []

    def add_counter(self, name, value, idx=None, dimensions=None):
        self.calls.append(("counter", name, value, {d.name: d.value for d in dimensions or []}))

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None):
        self.calls.append(("time", name, value, {d.name: d.value for d in dimensions or []}))


class FakeContext:
    """What the handler reads from TorchServe's Context, plus a record of per-request statuses."""

    def __init__(self, model_dir: Path, serialized_file: str, settings: dict[str, Any] | None = None,
                 model_name: str = "pneumonia", version: str = "1.0") -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": serialized_file, "modelName": model_name,
                                   "modelVersion": version}}
        # threads None: the test process keeps torch's own thread count (the shipped 1 would halve later tests)
        self.model_yaml_config = {"handler": {"threads": None, **(settings or {})}}
        self.model_name = model_name
        self.metrics = RecordingMetrics()
        self.statuses: dict[int, tuple[int, str]] = {}
        self.headers: dict[int, dict[str, str]] = {}

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers.get(idx, {})

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.headers.get(idx, {}).get(key)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


def write_tiny_checkpoint(path: Path, arch: str = "resnet18", image_size: int = 64, threshold: float = 0.5,
                          class_names: tuple[str, ...] = ("NORMAL", "PNEUMONIA")) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, len(class_names), 1).eval()
    positive = "PNEUMONIA" if len(class_names) == 2 else None
    config = ServingConfig(arch=arch, class_names=class_names, positive_class=positive,
                           threshold=threshold if positive else None,
                           preprocessing=PreprocessConfig(image_size=image_size))
    save_checkpoint(path, model, config, metrics={}, train_config={}, data_manifest_sha256="0" * 64, epoch=1)
    return path


def synthetic_xray(width: int = 320, height: int = 280) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    lungs = np.exp(-(((x - width * 0.3) ** 2) / 2500 + ((y - height / 2) ** 2) / 6000))
    lungs += np.exp(-(((x - width * 0.7) ** 2) / 2500 + ((y - height / 2) ** 2) / 6000))
    return np.clip(200 - 150 * lungs + 20 * np.sin(x / 7.0), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# The same image answered alone, inside a larger batch, by another backend or on another CPU gets probabilities
# that differ in the last bits (batched kernels sum in another order; measured: at most 2.4e-7 between batch 1
# and batches of 2-16 for the shipped model on a 2-core x86 machine, 1e-6 after rounding on an AVX-512 machine). Labels
# must be identical; probabilities agree within this tolerance, 100x the largest difference seen.
PROBABILITY_TOLERANCE = 1e-4


def assert_same_answer(answer: dict[str, Any], reference: dict[str, Any],
                       tolerance: float = PROBABILITY_TOLERANCE) -> None:
    """Same label and every other field; probabilities within `tolerance`."""
    assert answer["label"] == reference["label"]
    rounded = ("probabilities", "gate", "population")
    assert {k: v for k, v in answer.items() if k not in rounded} == \
        {k: v for k, v in reference.items() if k not in rounded}
    assert answer["probabilities"].keys() == reference["probabilities"].keys()
    for name, p in reference["probabilities"].items():
        assert abs(answer["probabilities"][name] - p) <= tolerance, (name, answer["probabilities"][name], p)
    if "gate" in reference:
        assert answer["gate"]["ran"] == reference["gate"]["ran"]
        if reference["gate"]["ran"]:
            assert abs(answer["gate"]["score"] - reference["gate"]["score"]) <= 1e-3  # rounded to 4 places
    if "population" in reference:  # same decision; the score is rounded to 4 places like the gate's
        assert answer["population"]["inside"] == reference["population"]["inside"]
        if "score" in reference["population"]:
            assert abs(answer["population"]["score"] - reference["population"]["score"]) <= 1e-3


def make_handler(model_dir: Path, serialized: str = "model.pt", **settings: Any):
    """An initialised handler over `model_dir/serialized`, with handler `settings` as model-config.yaml gives."""
    from handlers.cxr_handler import XrayHandler

    handler = XrayHandler()
    handler.initialize(FakeContext(model_dir, serialized, settings))
    return handler


def run(handler, rows: list[dict[str, Any]]) -> tuple[list[Any], dict[int, tuple[int, str]]]:
    """Handle one batch; returns the answers and the statuses the handler set per request index."""
    context = FakeContext(".", "model.pt")
    return handler.handle(rows, context), context.statuses


def inside_and_outside_images() -> tuple[bytes, bytes]:
    """Two X-ray-like images the tiny model's features tell apart (a synthetic film and its rolled copy)."""
    gray = synthetic_xray()
    return (encode(Image.fromarray(gray, mode="L"), "PNG"),
            encode(Image.fromarray(np.clip(gray.astype(int) // 2 + 60, 0, 255).astype(np.uint8), mode="L"), "PNG"))


def features_of(checkpoint: dict, images: list[bytes]) -> torch.Tensor:
    preset = EvalPreset(ServingConfig.from_checkpoint(checkpoint).preprocessing)
    with torch.no_grad():
        return resnet_forward(model_from_checkpoint(checkpoint), torch.stack([preset.load(i) for i in images]))[1]
