"""The README a newcomer reads and the figures the docs quote agree with the files they come from."""

import json
import re

import pytest
import torch

from cxr.checkpoint import load_checkpoint
from export.exporters import ONNX_OPSET
from tests.conftest import REPO, SHIPPED_CXR4, SHIPPED_MODEL

README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"


def requirement(name: str) -> str:
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return pins[name]


def test_readme_is_short_and_has_what_a_newcomer_needs():
    assert len(README.splitlines()) <= 250
    for heading in ("## Prerequisites", "## Two commands", "## A first request", "## The demo page",
                    "## Serving your own model", "## Changing the decision threshold", "## GPU",
                    "## Troubleshooting", "## Licences"):
        assert heading in README, heading
    for internal in ("lent", "the contract", "this machine"):
        assert not re.search(rf"\b{internal}\b", README), internal


def test_prerequisite_versions_follow_requirements_txt():
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in README.splitlines()
            if line.startswith("| ") and line.count("|") == 4}
    torch_row = rows["torch / torchvision"]
    assert f"{requirement('torch')} / {requirement('torchvision')}" in torch_row
    assert requirement("torchserve") in rows["TorchServe"]
    assert requirement("onnxruntime-gpu") in rows["ONNX Runtime"]


def test_every_linked_file_exists():
    for document in [REPO / "README.md", *DOCS.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)\)", document.read_text()):
            assert (document.parent / target).exists(), f"{document.relative_to(REPO)} links to missing {target}"


def test_readme_examples_use_committed_files():
    for path in set(re.findall(r"tests/fixtures/xrays/\w+/[\w-]+\.jpeg", README)):
        assert (REPO / path).is_file(), path


@pytest.fixture(scope="module")
def pneumonia():
    return load_checkpoint(SHIPPED_MODEL)


def test_the_threshold_is_quoted_as_the_checkpoint_has_it(pneumonia):
    """Every threshold written for the shipped model is the one inside it."""
    threshold = pneumonia["threshold"]
    assert f"{threshold:.4f}" in (DOCS / "pneumonia" / "README.md").read_text()
    assert str(threshold) in README
    for report in ("test.md", "val.md"):
        quoted = re.search(r"threshold: ([0-9.]+)", (DOCS / "pneumonia" / report).read_text()).group(1)
        assert float(quoted) == pytest.approx(threshold, abs=1e-9), report
    metrics = json.loads((REPO / "models" / "pneumonia" / "metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(threshold, abs=1e-9)


def test_model_docs_quote_the_recorded_test_figures(pneumonia):
    card = (DOCS / "pneumonia" / "README.md").read_text()
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity"):
        assert f"{pneumonia['metrics']['test'][key]:.3f}" in card, key
    if SHIPPED_CXR4.is_file():
        cxr4 = load_checkpoint(SHIPPED_CXR4)
        for key in ("macro_auc", "balanced_accuracy"):
            assert f"{cxr4['metrics']['test'][key]:.3f}" in (DOCS / "cxr4" / "README.md").read_text(), key


def test_gate_cost_is_quoted_from_its_measurements():
    latency = torch.load(REPO / "models" / "gate" / "ood_gate.pt", weights_only=True)["metrics"]["latency"]
    profile = json.loads((DOCS / "benchmarks.json").read_text())["profile"]
    trust = (DOCS / "trust.md").read_text()
    assert f"gate {latency['gate_ms']:.1f} ms vs ResNet-18 {latency['classifier_ms']:.0f} ms" in trust
    assert f"gate {profile['gate']:.1f} ms vs inference {profile['inference']:.1f} ms" in trust


def test_onnx_opset_is_the_one_the_exporter_sets():
    for document in (README, (DOCS / "serving.md").read_text()):
        for quoted in re.findall(r"opset (\d+)", document):
            assert int(quoted) == ONNX_OPSET
    assert f"opset {ONNX_OPSET}" in (DOCS / "serving.md").read_text()


def test_makefile_declares_its_phony_targets():
    makefile = (REPO / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*?)(?<!\\)$", makefile, re.M | re.S).group(1).replace("\\", " ").split())
    targets = {m for m in re.findall(r"^([a-z][\w-]*):", makefile, re.M)}
    assert targets <= phony, sorted(targets - phony)


def test_licence_and_notice():
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Apache-2.0" in (REPO / "pyproject.toml").read_text()
    notice = (REPO / "NOTICE").read_text()
    for source in ("Kermany", "CC BY 4.0", "COVID-19 Radiography Database", "no licence", "TBX11K"):
        assert source in notice, source


@pytest.mark.parametrize("name", ["pneumonia", "cxr4"])
def test_model_cards_follow_their_checkpoints(name):
    """Each card names its checkpoint's sha256, its check's limit and intended population, in Mitchell et
    al.'s sections; the fit report it links is there."""
    import hashlib

    path = REPO / "models" / name / "model.pt"
    card = (REPO / "docs" / "model_cards" / f"{name}.md").read_text()
    check = load_checkpoint(path)["population_check"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card
    assert f"{check['limit']:.4f}" in card and check["model_card"] == f"docs/model_cards/{name}.md"
    assert check["intended_population"] in " ".join(card.split())
    for section in ("Model details", "Intended use", "Population and data", "Metrics",
                    "Cross-source evaluation and the population check", "Calibration", "Known failure modes",
                    "Caveats"):
        assert f"## {section}" in card, section
    assert (REPO / "docs" / "population" / f"{name}.md").is_file()
