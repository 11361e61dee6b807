"""The request policy's rules, the handler's typed settings and the shipped core's boundary."""

import ast
import base64
import re
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import yaml
from PIL import Image

from cxr_core.policy import DECODER_RULES, RULE, RULES, Refusal, RequestPolicy
from cxr_core.population import PopulationSettings
from cxr_core.preprocessing import EvalPreset, PreprocessConfig
from cxr_core.settings import HandlerSettings
from tests.conftest import REPO
from tests.handler_support import encode, make_handler, run, synthetic_xray, write_tiny_checkpoint

CORE = REPO / "cxr_core"
SHIPPED_YAML = REPO / "handlers" / "model-config.yaml"


def rules_summary() -> str:
    """README's table: one row per status, the rules in the order they are checked."""
    statuses = sorted({rule.status for rule in RULES})
    lines = ["| status | refused, in the order checked (handler setting) |", "|---|---|"]
    for status in statuses:
        cells = [rule.refuses + (f" (`{rule.setting}`)" if rule.setting else "") for rule in RULES
                 if rule.status == status]
        lines.append(f"| {status} | {'; '.join(cells)} |")
    return "\n".join(lines)


def rules_table() -> str:
    """docs/serving.md's table: every rule, in order, with its status, metric label and shipped setting."""
    defaults = asdict(HandlerSettings())
    lines = ["| # | rule | refuses | status | `CxrRejected` reason | setting (shipped value) |",
             "|---|---|---|---|---|---|"]
    for number, rule in enumerate(RULES, 1):
        setting = f"`{rule.setting}: {defaults[rule.setting]}`" if rule.setting else ""
        lines.append(f"| {number} | `{rule.name}` | {rule.refuses} | {rule.status} | `{rule.reason}` | {setting} |")
    return "\n".join(lines)


@pytest.mark.parametrize(("document", "render"), [("README.md", rules_summary),
                                                   ("docs/serving.md", rules_table)])
def test_the_docs_print_the_rules_as_the_code_has_them(document, render):
    expected = render()
    assert expected in (REPO / document).read_text(), f"{document} should hold, as generated:\n{expected}"


def test_rules_are_named_once_and_their_settings_exist():
    assert len(RULE) == len(RULES)
    settings = set(asdict(HandlerSettings()))
    assert {rule.setting for rule in RULES if rule.setting} <= settings
    assert all(400 <= rule.status < 600 for rule in RULES)


def test_every_kind_the_decoder_raises_is_a_rule():
    source = (CORE / "preprocessing.py").read_text()
    kinds = set(re.findall(r'InvalidImageError\([^()]*(?:\([^()]*\)[^()]*)*,\s*"(\w+)"\)', source, re.S))
    assert kinds and kinds | {"unreadable"} == set(DECODER_RULES)
    assert set(DECODER_RULES.values()) <= set(RULE)


def test_a_refusal_takes_its_status_and_reason_from_its_rule():
    refusal = Refusal("pixel_budget", "too many pixels")
    assert (refusal.status, refusal.reason, refusal.message) == (413, "too_large", "too many pixels")
    with pytest.raises(KeyError):
        Refusal("no_such_rule", "?")


def test_the_shipped_yaml_and_the_defaults_agree():
    shipped = yaml.safe_load(SHIPPED_YAML.read_text())["handler"]
    assert HandlerSettings.from_yaml(shipped) == HandlerSettings()
    assert shipped == asdict(HandlerSettings())


@pytest.mark.parametrize(("section", "named"), [
    ({"max_image_byte": 1000}, "'max_image_byte'"),
    ({"min_side": "64"}, "min_side"),
    ({"ood_gate": 1}, "ood_gate"),
    ({"population_check": "maybe"}, "population_check: 'maybe'"),
])
def test_a_wrong_setting_is_refused_by_name(section, named):
    with pytest.raises(ValueError, match=re.escape(named)) as refused:
        HandlerSettings.from_yaml(section)
    if "max_image_byte" in section:
        assert "max_image_bytes" in str(refused.value)  # the known settings are listed


def test_a_typo_in_model_config_fails_the_workers_load(tmp_path):
    write_tiny_checkpoint(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="unknown handler setting 'max_images_per_requests'"):
        make_handler(tmp_path, max_images_per_requests=4)
    assert HandlerSettings.from_yaml({"max_request_seconds": 5, "threads": None}).max_request_seconds == 5


def test_every_refusal_the_handler_gives_is_a_rule(tmp_path):
    write_tiny_checkpoint(tmp_path / "model.pt")
    handler = make_handler(tmp_path, ood_gate=False)
    answers, statuses = run(handler, [{"body": b""}, {"body": b"not an image"}, {"body": [1, 2]}])
    reasons = {call[3]["Reason"] for call in handler.context.metrics.calls if call[1] == "CxrRejected"}
    assert len(statuses) == 3 and reasons <= {rule.reason for rule in RULES}
    assert [answer["code"] for answer in answers] == [400, 400, 400]


def _project_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        yield from (name for name in names if name.split(".")[0] in ("cxr", "cxr_core", "training", "export",
                                                                     "loadtest", "handlers", "tests"))


def test_the_core_and_the_handler_import_only_the_core():
    for path in [*CORE.glob("*.py"), REPO / "handlers" / "cxr_handler.py"]:
        outside = [name for name in _project_imports(path) if not name.startswith("cxr_core")]
        assert not outside, f"{path.name} imports {outside}"


def test_importing_the_core_leaves_pillows_limit_alone():
    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import cxr_core.policy, cxr_core.served, "
            "handlers.cxr_handler; assert Image.MAX_IMAGE_PIXELS == before, Image.MAX_IMAGE_PIXELS")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def _encoded(size, fmt="PNG"):
    return encode(Image.fromarray(synthetic_xray(*size), mode="L"), fmt)


@pytest.mark.parametrize(("row", "settings", "first", "also"), [
    ({"body": {"instances": [base64.b64encode(b"x" * 50).decode()] * 3}}, {"max_images_per_request": 2},
     "image_count", "image_bytes"),
    ({"body": b"GIF89a" + b"\0" * 64}, {"max_image_bytes": 32}, "image_bytes", "format"),
    ("tiny_gif", {}, "format", "min_side"),
    ("tiny_png", {"max_request_pixels": 100}, "pixel_budget", "min_side"),
    ("narrow_png", {}, "min_side", "aspect_ratio"),
])
def test_of_two_broken_rules_the_earlier_one_answers(row, settings, first, also):
    images = {"tiny_gif": _encoded((40, 40), "GIF"), "tiny_png": _encoded((40, 40)), "narrow_png": _encoded((300, 20))}
    row = {"body": images[row]} if isinstance(row, str) else row
    policy = RequestPolicy(replace(HandlerSettings(), **settings), EvalPreset(PreprocessConfig(image_size=64)))
    with pytest.raises(Refusal) as refused:
        policy.admit(row)
    order = [rule.name for rule in RULES]
    assert refused.value.rule.name == first and order.index(first) < order.index(also)


def test_the_gate_answers_before_the_population_check():
    population = PopulationSettings("logistic", 0.5, "children", "docs/model_cards/x.md")
    policy = RequestPolicy(HandlerSettings(), EvalPreset(PreprocessConfig(image_size=64)))
    refusal = policy.judge(gate_scores=np.array([0.9]), population_scores=np.array([0.9]), gate_limit=0.5,
                           population=population, population_mode="refuse")
    assert refusal.rule.name == "not_a_chest_xray"
    refusal = policy.judge(gate_scores=np.array([0.1, 0.2]), population_scores=np.array([0.1, 0.9]), gate_limit=0.5,
                           population=population, population_mode="refuse")
    assert refusal.rule.name == "outside_population" and refusal.details["image"] == 1
    assert refusal.details["intended_population"] == "children"
    assert policy.judge(gate_scores=None, population_scores=np.array([0.9]), gate_limit=None,
                        population=population, population_mode="warn") is None
