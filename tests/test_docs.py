"""The README a newcomer reads and the figures the docs quote agree with the files they come from."""

import csv
import hashlib
import itertools
import json
import re

import pytest
import torch

from cxr_core.checkpoint import load_checkpoint
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
                    "## Your own model", "## Changing the decision threshold", "## GPU",
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


def test_model_docs_quote_the_recorded_test_figures(pneumonia, cxr4):
    card = (DOCS / "pneumonia" / "README.md").read_text()
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity"):
        assert f"{pneumonia['metrics']['test'][key]:.3f}" in card, key
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
    path = REPO / "models" / name / "model.pt"
    card = (REPO / "docs" / "model_cards" / f"{name}.md").read_text()
    check = load_checkpoint(path)["population_check"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card
    assert f"{check['limit']:.4f}" in card and check["model_card"] == f"docs/model_cards/{name}.md"
    assert check["intended_population"] in " ".join(card.split())
    for section in ("Model details", "Intended use", "Population and data", "Metrics", "Caveats",
                    "Cross-source evaluation and the population check", "Calibration", "Known failure modes"):
        assert f"## {section}" in card, section
    assert (REPO / "docs" / "population" / f"{name}.md").is_file()


# The model cards, model pages and summaries: each figure they quote is read from its committed report or checkpoint.

CARDS = DOCS / "model_cards"
SPLITS = ("train", "val", "test")


def load_json(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def flat(path) -> str:
    """A document with its line breaks and bold marks taken out, so a figure is found wherever the prose wraps."""
    return " ".join(path.read_text().replace("**", "").split())


def pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def table_rows(document: str) -> list[list[str]]:
    """Every Markdown table line of `document` as its cells (bold marks taken out)."""
    return [[cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]
            for line in document.splitlines() if line.startswith("|")]


def row(path, first_cell: str) -> list[str]:
    """The cells of the first table row in `path` whose first cell starts with `first_cell`."""
    return next(cells for cells in table_rows(path.read_text()) if cells[0].startswith(first_cell))


def markdown_table(path, first_cell: str) -> list[list[str]]:
    """The body rows of the table in `path` whose header's first cell is `first_cell`."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and table_rows(line)[0][0] == first_cell)
    return table_rows("\n".join(itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2:])))


@pytest.fixture(scope="module")
def cxr4():
    return load_checkpoint(SHIPPED_CXR4)


def test_the_pneumonia_card_quotes_its_reports(pneumonia):
    card = CARDS / "pneumonia.md"
    text, recorded = flat(card), load_json("models/pneumonia/metrics.json")
    test, val, ci = pneumonia["metrics"]["test"], pneumonia["metrics"]["val"], recorded["test"]["ci95"]
    for label, key in (("ROC AUC", "roc_auc"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                       ("specificity", "specificity"), ("balanced accuracy", "balanced_accuracy")):
        assert row(card, label)[1:] == [f"{test[key]:.3f}", "{:.3f} - {:.3f}".format(*ci[key])], label
    assert f"T = {pneumonia['temperature']:.3f}" in text and f"p(PNEUMONIA) >= {pneumonia['threshold']:.4f}" in text
    assert f"epoch {recorded['best_epoch']} of {pneumonia['train_config']['epochs']} (best val AUC)" in text
    population = load_json("docs/population/pneumonia.json")
    groups, loso = population["groups"], population["loso"]
    films = [groups[f"kermany/{split}"]["films"] for split in SPLITS]
    assert "training (train {:,}), validation ({}), test ({}, official)".format(*films) in text
    in_crd = sum(groups[f"kermany_in_crd/{split}"]["films"] for split in SPLITS)
    assert f"{in_crd} of its {in_crd + sum(groups[f'crd_normal/{s}']['films'] for s in SPLITS):,} films" in text
    val_flagged = [pct(groups[f"kermany/val{label}"]["flagged"]) for label in ("", "/NORMAL", "/PNEUMONIA")]
    assert "it flags {} of Kermany val: NORMAL {}, PNEUMONIA {}".format(*val_flagged) in text
    cost = load_json("docs/population/cost.json")
    assert "costs {:.1f}-{:.1f}% of the model's throughput and {:.1f}% end to end".format(
        *sorted(100 * cost[b]["cost"] for b in ("b1", "b8")), 100 * cost["end_to_end"]["cost"]) in text
    rsna = [groups[f"rsna/{split}{label}"] for label in ("", "/OPACITY") for split in ("val", "test")]
    assert row(card, "RSNA adults")[1:] == ["{} / {}".format(*(g["films"] for g in rsna[:2])),
                                            "{} / {} (OPACITY {} / {})".format(*(pct(g["flagged"]) for g in rsna))]
    for first_cell, key in (("Kermany official test", "kermany/test"), ("Kermany val (own)", "kermany/val"),
                            ("samples/", "samples/test"), ("Kermany normals inside the CRD", "kermany_in_crd/test"),
                            ("CRD Normal, adult, Kermany copies set aside, test", "crd_normal/test"),
                            ("CRD COVID-19, test", "crd_covid/test"), ("TBX11K, test", "tbx11k/test")):
        cells = row(card, first_cell)
        assert cells[1] == str(groups[key]["films"]) and cells[2].startswith(pct(groups[key]["flagged"])), cells
    assert "(NORMAL {}, PNEUMONIA {})".format(*(pct(groups[f"kermany/test/{label}"]["flagged"])
                                                for label in ("NORMAL", "PNEUMONIA"))) in text
    assert "CRD adult Normal {} / {}, CRD COVID-19 {} / {}, TBX11K {} / {}, RSNA adults {} / {}".format(
        *(pct(loso[source][part]) for source in ("crd_normal", "crd_covid", "tbx11k", "rsna")
          for part in ("train+val", "test"))) in text
    assert min(v["train+val"] for v in loso.values()) >= 0.8 and "(goal >= 80%: met)" in text
    for source in ("crd_normal/test", "crd_covid/test", "tbx11k/test", "rsna/test"):  # said of those let through
        said = groups[source]["not_flagged_said"]
        assert f"{max(said.values())} of {sum(said.values())} {max(said, key=said.get)}" in text, source
    calibration = load_json("docs/pneumonia/calibration.json")
    assert ("ECE val {:.4f} -> {:.4f}, test {:.4f} -> {:.4f}; Brier test {:.4f} -> {:.4f}".format(
        *(calibration[split][when][score] for split, score in (("val", "ece"), ("test", "ece"), ("test", "brier"))
          for when in ("before", "after")))) in text
    (_, called_pneumonia), _ = recorded["test"]["confusion_matrix"]
    normals = groups["kermany/test/NORMAL"]["films"]
    assert (f"specificity {val['specificity']:.3f} on val, {test['specificity']:.3f} on the official test split "
            f"({called_pneumonia} of {normals} test NORMAL films called PNEUMONIA)") in text
    assert (f"({pct(groups['kermany/test/NORMAL']['flagged'])} of test NORMAL films flagged against "
            f"{pct(groups['kermany/val/NORMAL']['flagged'])} on val)") in text


def test_the_cxr4_card_quotes_its_reports(cxr4):
    card = CARDS / "cxr4.md"
    text, recorded, test = flat(card), load_json("models/cxr4/metrics.json"), cxr4["metrics"]["test"]
    ci = recorded["test"]["ci95"]
    for label, key in (("macro ROC AUC", "macro_auc"), ("balanced accuracy", "balanced_accuracy"),
                       ("accuracy", "accuracy")):
        assert row(card, label)[1:] == [f"{test[key]:.3f}", "{:.3f} - {:.3f}".format(*ci[key])], label
    matrix = [[int(v) for v in cells[1:]] for cells in markdown_table(DOCS / "cxr4" / "test.md", "")]
    names = cxr4["class_names"]
    sensitivities = ", ".join(f"{name} {matrix[k][k] / sum(matrix[k]):.3f}" for k, name in enumerate(names))
    assert f"Per-class sensitivity: {sensitivities}." in text
    covid, normal, tb = (names.index(name) for name in ("COVID19", "NORMAL", "TUBERCULOSIS"))
    assert matrix[covid][tb] == matrix[normal][tb]
    assert (f"COVID19 <-> NORMAL confusions ({matrix[covid][normal]} / {matrix[normal][covid]} on test), both -> "
            f"TUBERCULOSIS ({matrix[covid][tb]} each)") in text
    assert f"T = {cxr4['temperature']:.3f}" in text
    assert f"epoch {recorded['best_epoch']} of {cxr4['train_config']['epochs']} (best val AUC)" in text
    assert "ECE test {} -> {}".format(*row(DOCS / "cxr4" / "calibration.md", "test")[1:3]) in text
    acceptance = torch.load(REPO / "models" / "gate" / "ood_gate.pt", weights_only=True)["metrics"]["acceptance"]
    train = sum(v["n"] for k, v in acceptance.items() if k.startswith("multiclass/train/"))
    normal_class = sum(v["n"] for k, v in acceptance.items() if k.startswith("multiclass/") and k.endswith("/NORMAL"))
    assert f"train {train:,} / val {cxr4['metrics']['val']['n']} / test {test['n']} films" in text
    population = load_json("docs/population/cxr4.json")
    groups, loso = population["groups"], population["loso"]
    in_crd = sum(groups[f"kermany_in_crd/{split}"]["films"] for split in SPLITS)
    assert f"{in_crd} of {normal_class:,} films are Kermany pediatric normals" in text
    own_val = {key: v["flagged"] for key, v in groups.items() if key.endswith("/val") and v["population"] == "own"}
    assert max(own_val, key=own_val.get) == "crd_covid/val"
    assert (f"flags {pct(population['own_val_flagged'])} of val, at most {pct(max(own_val.values()))} of a source: "
            "CRD COVID-19") in text
    assert row(card, f"own val ({test['n']})")[1] == pct(population["own_val_flagged"])
    own_test = ["crd_normal/test", "crd_covid/test", "kermany_multiclass/test", "tbx11k/test"]
    cells = row(card, "own test")
    assert [int(n) for n in re.findall(r"(\d+)(?= /|$)", cells[0])] == [groups[k]["films"] for k in own_test]
    assert cells[1] == " / ".join(pct(groups[k]["flagged"]) for k in own_test)
    samples = groups["samples/test"]
    assert row(card, f"samples/ ({samples['films']}")[1] == pct(samples["flagged"])
    for first_cell, key in (("Kermany pediatric NORMAL test films", "kermany/test/NORMAL"),
                            ("RSNA adults with lung opacity, test films", "rsna/test/Lung Opacity")):
        films = groups[key]  # none flagged, so every one of them is answered, as the card's counts say
        assert films["flagged"] == 0 and row(card, f"{first_cell} ({films['films']}")[1] == pct(films["flagged"])
        calls = sorted(films["not_flagged_said"].items(), key=lambda kv: (kv[0] != "NORMAL", -kv[1]))
        assert "calls them " + ", ".join(f"{label} {n}" for label, n in calls) + f" times of {films['films']}" in text
    assert ("CRD Normal {} / {}, CRD COVID-19 {} / {}, TBX11K {} / {}, Kermany {} / {}".format(
        *(pct(loso[source][part]) for source in ("crd_normal", "crd_covid", "tbx11k", "kermany")
          for part in ("train+val", "test")))) in text
    bias = load_json("docs/cxr4/source_bias.json")["statistics_only"]["grey levels + image size"]
    assert f"macro AUC {bias['macro_auc']:.3f}" in text


def test_the_model_pages_quote_their_reports(pneumonia, cxr4):
    page = flat(DOCS / "pneumonia" / "README.md")
    test, val = pneumonia["metrics"]["test"], pneumonia["metrics"]["val"]
    assert f"precision / F1 / PR AUC | {test['precision']:.3f} / {test['f1']:.3f} / {test['pr_auc']:.3f}" in page
    (tn, fp), (fn, tp) = load_json("models/pneumonia/metrics.json")["test"]["confusion_matrix"]
    assert f"NORMAL {tn} / {fp}, PNEUMONIA {fn} / {tp}" in page
    assert f"AUC {val['roc_auc']:.4f}, sensitivity {val['sensitivity']:.3f} and specificity {val['specificity']:.3f}" \
        in page
    assert f"{test['sensitivity']:.3f} sensitivity but only {test['specificity']:.3f} specificity on test" in page
    assert f"{SHIPPED_MODEL.stat().st_size / 1e6:.1f} MB" in page and f"(T = {pneumonia['temperature']:.3f})" in page
    adults = load_json("docs/population/pneumonia.json")["groups"]["crd_normal/test"]["flagged"]
    assert f"its population check refuses such films ({pct(adults)} of the adult normal films" in page
    cxr4_dir = DOCS / "cxr4"
    for name, document in (("pneumonia", page), ("cxr4", flat(cxr4_dir / "README.md"))):
        epochs = csv.DictReader((REPO / "models" / name / "metrics.csv").read_text().splitlines())
        minutes = sum(float(epoch["epoch_seconds"]) for epoch in epochs) / 60
        assert f"{minutes:.0f} min of training epochs on 2 CPU cores" in document, name
    page = flat(cxr4_dir / "README.md")
    assert f"{SHIPPED_CXR4.stat().st_size / 1e6:.1f} MB" in page and f"(T = {cxr4['temperature']:.3f})" in page
    ci = load_json("models/cxr4/metrics.json")["test"]["ci95"]["accuracy"]
    assert "accuracy | {:.3f} | {:.3f} - {:.3f}".format(cxr4["metrics"]["test"]["accuracy"], *ci) in page
    per_class = {cells[0]: cells for cells in markdown_table(cxr4_dir / "test.md", "class")}
    for cells in markdown_table(cxr4_dir / "README.md", "class"):  # quoted to 3 places from the report's 4
        for quoted, measured in zip(cells[1:], per_class[cells[0]][2:], strict=True):
            assert abs(float(quoted) - float(measured)) <= 0.00051, (cells, per_class[cells[0]])
    before = row(cxr4_dir / "calibration.md", "test")[1]
    assert f"test ECE {float(before):.3f} -> {cxr4['metrics']['test']['ece']:.3f}" in page
    bias = load_json("docs/cxr4/source_bias.json")
    probe = bias["probe"]["NORMAL"]
    assert "called NORMAL only {:.0f}% of the time and PNEUMONIA {:.0f}%".format(
        *(100 * probe[label] / sum(probe.values()) for label in ("NORMAL", "PNEUMONIA"))) in page
    grey, sized = (bias["statistics_only"][k] for k in ("grey levels", "grey levels + image size"))
    assert f"balanced accuracy {grey['balanced_accuracy']:.3f} / macro AUC {grey['macro_auc']:.3f}" in page
    assert f"{sized['balanced_accuracy']:.3f} / {sized['macro_auc']:.3f}" in page


def test_trust_quotes_the_gate_population_and_cost_reports():
    trust, gate_metrics = flat(DOCS / "trust.md"), torch.load(REPO / "models/gate/ood_gate.pt", weights_only=True)
    accepted, refused = (gate_metrics["metrics"][key] for key in ("acceptance", "held_out_refusal"))
    assert f"above its limit ({gate_metrics['limit']:.3f}," in trust and \
        f"lowest {100 * min(v['accepted'] for v in accepted.values()):.2f}%" in trust
    assert f"held-out non-X-rays refused ({sum(v['n'] for v in refused.values())}:" in trust
    assert (f"{pct(gate_metrics['metrics']['held_out_refused'])} (lowest category: inverted X-rays "
            f"{pct(refused['inverted_xray']['refused'])})") in trust
    calibration = load_json("docs/pneumonia/calibration.json")
    for split in ("val", "test"):
        scores = [calibration[split][when][s] for s in ("ece", "brier") for when in ("before", "after")]
        assert "| {:.4f} | {:.4f} | {:.4f} | {:.4f} |".format(*scores) in trust, split
    groups, loso = (load_json("docs/population/pneumonia.json")[key] for key in ("groups", "loso"))
    assert f"it flags {pct(groups['kermany/val']['flagged'])} of Kermany val" in trust
    assert f"| {pct(groups['kermany/test']['flagged'])} (met;" in trust and groups["kermany/test"]["flagged"] <= 0.02
    assert round(groups["samples/test"]["flagged"] * groups["samples/test"]["films"]) == 1  # "| 1 (a NORMAL film"
    sources = ("crd_normal", "crd_covid", "tbx11k", "rsna")
    assert " / ".join(pct(groups[f"{s}/test"]["flagged"]) for s in sources) in trust
    assert " / ".join(f"{pct(loso[s]['train+val'])} ({pct(loso[s]['test'])})" for s in sources) in trust
    cost = load_json("docs/population/cost.json")
    for rates in (cost["b1"], cost["b8"]):
        assert f"{rates['plain_images_per_s']:.1f} -> {rates['checked_images_per_s']:.1f}" in trust, rates
        assert f"({100 * rates['cost']:.1f}%)" in trust, rates
    e2e = cost["end_to_end"]
    assert (f"{e2e['plain_requests_per_s']:.1f} -> {e2e['checked_requests_per_s']:.1f} requests/s "
            f"({100 * e2e['cost']:.1f}%;") in trust and f"--rounds {len(e2e['rounds']['plain'])}" in trust


def test_performance_quotes_the_committed_benchmark_and_drill_runs():
    from loadtest.bench_report import ratios

    path = DOCS / "performance.md"
    shipped, matrix = load_json("docs/benchmarks.json"), load_json("docs/benchmarks_matrix.json")
    for run in (shipped, matrix):  # JSON keys are text; the report's batch sizes are numbers
        run["model_only"] = {name: {int(b): v for b, v in values.items()} for name, values in run["model_only"].items()}
    measured = [ratios(run) for run in (matrix, shipped)]
    for goal, key in ((">= 2x the naive FastAPI baseline", "ours_over_naive"),
                      ("end to end >= 0.8x model-only", "e2e_over_model_only"),
                      ("p99 <= 2x p50 at 80% of max load", "p99_over_p50_at_80")):
        assert [cell.split(" ")[0] for cell in row(path, goal)[1:]] == [f"{r[key]:.2f}x" for r in measured], goal
    ours, litserve = shipped["e2e"][shipped["default_config"]], shipped["litserve"]
    at80, lit100 = ours["load"]["80%"], litserve["load"]["100%"]
    matrix80 = matrix["e2e"][matrix["default_config"]]["load"]["80%"]
    e2e = {name.removeprefix("bench_"): run["max"] for name, run in matrix["e2e"].items()}
    onnx, d5, int8, aoti = (e2e[f"{v}_d{d}_w2_t1"] for v, d in (("onnx_b8", 10), ("onnx_b8", 5), ("int8_b8", 10),
                                                                  ("aoti_b8", 10)))
    agreement, single = float(row(DOCS / "export.md", "int8")[7]), shipped["single"]["p50_ms"]
    drills = load_json("docs/reliability.json")
    rates = [(run["e2e"][run["default_config"]]["max"]["throughput"], run["litserve"]["max"]["throughput"])
             for run in (matrix, shipped)]
    quoted = [*(f"{r['ours_over_litserve']:.2f}x, p99 {r['p99_over_litserve_p99']:.2f}x" for r in measured),
              "ours / LitServe, X-rays/s | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in rates),
              f"({at80['offered_rate']:.1f} X-rays/s offered) ours answers with p50 {at80['p50_ms']:.0f} ms and p99 "
              f"{at80['p99_ms']:.0f} ms, while LitServe at its own maximum ({lit100['offered_rate']:.1f}/s offered) "
              f"has p50 {lit100['p50_ms']:.0f} ms and p99 {lit100['p99_ms']:.0f} ms",
              f"{ours['max']['p99_ms']:.0f} ms against LitServe's {litserve['max']['p99_ms']:.0f} ms",
              f"{d5['throughput']:.1f} against {onnx['throughput']:.1f}, p99 {d5['p99_ms']:.0f} against "
              f"{onnx['p99_ms']:.0f} ms",
              f"p50 is {at80['p50_ms']:.0f} ms at {at80['offered_rate']:.1f}/s offered; the matrix run's at 10 ms, "
              f"{matrix80['p50_ms']:.0f} ms at {matrix80['offered_rate']:.1f}/s",
              f"gives {onnx['throughput']:.1f} against {e2e['onnx_b8_d10_w1_t2']['throughput']:.1f}",
              f"{int8['throughput']:.1f} X-rays/s in the matrix run, "
              f"{int8['throughput'] / onnx['throughput']:.1f}x ONNX",
              f"changes {round((1 - agreement) * 525)} of 525 validation labels",
              f"{aoti['throughput']:.1f} against {onnx['throughput']:.1f} X-rays/s, p99 {aoti['p99_ms']:.0f} against "
              f"{onnx['p99_ms']:.0f} ms",
              f"({single - sum(shipped['profile'].values()):.2f} of one request's {single:.2f} ms",
              f"{drills['peak']:.1f} X-rays/s with {drills['concurrency']} clients",
              f"0 failures of {drills['soak']['requests']:,}",
              f"({ours['max']['throughput']:.1f} in docs/benchmarks.md)"]
    for phrase in quoted:
        assert phrase in flat(path), phrase


def test_docs_speak_of_the_project_as_it_is():
    """No issue numbers, dates, one machine's timings or history in the pages a newcomer reads; every variant in
    each list of them; the answer's every key."""
    from cxr_core.variants import VARIANTS

    for path in (CARDS / "pneumonia.md", CARDS / "cxr4.md", DOCS / "cxr4/README.md", REPO / "model_store/README.md"):
        assert "{" + ",".join(VARIANTS) + "}.mar" in path.read_text(), path
    serving = (DOCS / "serving.md").read_text()
    assert "(" + ", ".join(f"`{name}`" for name in VARIANTS) + ":" in serving
    assert '"threshold", "gate", "population"}' in serving
    pages = [REPO / "README.md", *REPO.glob("*/README.md"), *CARDS.glob("*.md"), *DOCS.glob("*/README.md"),
             *(DOCS / f"{name}.md" for name in ("clients", "deployment", "performance", "serving", "training", "trust",
                                                "gpu_bench"))]
    for page in pages:
        for pattern in (r"\bissue \d+", r"the issue's", r"\b20\d\d-\d\d-\d\d\b", r"held back", r"first release",
                        r"AVX2-only", r"\d+ s here", r"measured again\b", r"\blent\b"):
            assert not re.search(pattern, flat(page), re.I), f"{page.relative_to(REPO)}: {pattern}"
    readme = flat(REPO / "README.md")
    assert "nothing is skipped" not in readme and "3 container-image tests skip" in readme
    rss = [mb for run in load_json("docs/benchmarks.json")["e2e"].values() for mb in run["rss_mb"]["workers"]]
    assert f"about {round(sum(rss) / len(rss), -1):.0f} MB each" in readme
    disk = (REPO / "scripts" / "system-deps.sh").read_text()
    assert all(size in readme and size in disk for size in ("6.6 GB", "6.9 GB"))
