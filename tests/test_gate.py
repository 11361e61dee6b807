"""The out-of-distribution gate: the shipped gate accepts real X-rays and refuses what is not one, in the
handler (per image, neighbours unaffected) and on its own; the switch turns it off."""

import shutil

import numpy as np
import pytest
from PIL import Image

from cxr_core.gate import GATE_FILE, GateNet, OodGate, gate_input
from tests.conftest import REPO
from tests.handler_support import encode, make_handler, run, write_tiny_checkpoint
from training.not_xrays import CATEGORIES, not_xrays, split_of

SHIPPED_GATE = REPO / "models" / "gate" / GATE_FILE


@pytest.fixture(scope="module")
def gate_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gated")
    write_tiny_checkpoint(folder / "model.pt", image_size=128)
    shutil.copy2(SHIPPED_GATE, folder / GATE_FILE)
    return folder


@pytest.fixture(scope="module")
def photo_jpeg():
    """A photograph shipped with scikit-image (never used to fit the gate: it is in the held-out half)."""
    items = {item.name: item for item in not_xrays([], crops_per_photo=0, synthetic_per_kind=0)}
    name = next(n for n in ("skimage/astronaut", "skimage/coffee", "skimage/chelsea")
                if n in items and split_of(items[n].source) == "held_out")
    return encode(items[name].image.convert("RGB"), "JPEG", quality=90)


def test_gate_input_is_a_64px_thumbnail_in_unit_range():
    import torch

    batch = torch.randn(3, 1, 128, 128)
    thumbs = gate_input(batch, 0.484, 0.234)
    assert thumbs.shape == (3, 1, 64, 64) and float(thumbs.min()) >= 0 and float(thumbs.max()) <= 1
    assert GateNet()(thumbs).shape == (3,)


def test_shipped_gate_is_small_and_records_its_figures():
    assert SHIPPED_GATE.stat().st_size < 1_000_000
    gate = OodGate.load(SHIPPED_GATE)
    metrics = gate.info["metrics"]
    assert 0.5 <= gate.limit < 1.0
    assert min(v["accepted"] for v in metrics["acceptance"].values()) >= 0.995
    assert metrics["held_out_refused"] >= 0.95


def test_handler_answers_every_sample_and_refuses_a_photo(gate_model_dir, sample_paths, photo_jpeg):
    handler = make_handler(gate_model_dir)
    rows = [{"body": path.read_bytes()} for path in sample_paths[:7]] + [{"body": photo_jpeg}]
    answers, statuses = run(handler, rows)
    assert list(statuses) == [7] and statuses[7][0] == 422
    assert answers[7]["error"] == "not a chest X-ray" and answers[7]["gate_score"] > answers[7]["gate_limit"]
    for answer in answers[:7]:
        assert answer["label"] in ("NORMAL", "PNEUMONIA")
        assert answer["gate"]["ran"] and answer["gate"]["score"] <= answer["gate"]["limit"]
    rejected = [c for c in handler.context.metrics.calls if c[1] == "CxrRejected"]
    assert rejected == [("counter", "CxrRejected", 1, {"Reason": "not_a_chest_xray"})]


def test_every_sample_passes_the_gate(gate_model_dir, sample_paths):
    answers, statuses = run(make_handler(gate_model_dir), [{"body": p.read_bytes()} for p in sample_paths])
    assert statuses == {} and all(answer["gate"]["ran"] for answer in answers)


def test_one_photo_among_several_images_names_its_index(gate_model_dir, sample_paths, photo_jpeg):
    import base64

    images = [base64.b64encode(b).decode() for b in (sample_paths[0].read_bytes(), photo_jpeg)]
    [answer], statuses = run(make_handler(gate_model_dir), [{"body": {"instances": images}}])
    assert statuses[0][0] == 422 and answer["image"] == 1 and answer["error"] == "not a chest X-ray"


def test_switch_turns_the_gate_off(gate_model_dir, photo_jpeg):
    [answer], statuses = run(make_handler(gate_model_dir, ood_gate=False), [{"body": photo_jpeg}])
    assert statuses == {} and answer["gate"] == {"ran": False} and answer["label"] in ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize("category", ["noise", "blank", "document", "drawing"])
def test_synthetic_non_xrays_are_refused(gate_model_dir, category):
    """Fresh synthetic images (a seed never used in fitting) of each kind: nearly all refused."""
    items = [item for item in not_xrays([], crops_per_photo=0, synthetic_per_kind=12, seed=99)
             if item.category == category]
    rows = [{"body": encode(item.image.convert("L"), "PNG")} for item in items]
    answers, statuses = run(make_handler(gate_model_dir), rows)
    refused = [i for i, (code, _) in statuses.items() if code == 422]
    assert len(refused) >= 0.9 * len(items), [a.get("gate", a.get("gate_score")) for a in answers]


def test_negative_set_covers_every_category_and_splits_by_source(xray_tree):
    items = not_xrays([xray_tree], crops_per_photo=1, synthetic_per_kind=4)
    assert {item.category for item in items} == set(CATEGORIES)
    by_source = {}
    for item in items:
        by_source.setdefault(item.source, set()).add(split_of(item.source))
    assert all(len(splits) == 1 for splits in by_source.values())
    assert {split_of(item.source) for item in items} == {"dev", "held_out"}
    assert all(isinstance(item.image, Image.Image) and min(item.image.size) > 0 for item in items)
    assert not any("/test/" in item.source or item.source.startswith("test") for item in items)
    assert np.mean([split_of(s) == "held_out" for s in by_source]) == pytest.approx(0.5, abs=0.2)
