"""A served model judged through TorchServe: every film of an ImageFolder split sent as a client sends it, the
answers scored with 95% bootstrap intervals, the refusals counted by reason, and what came back for each of the
folder's classes (for another data set's classes, the only figures that can be given).

    make serve && python -m training.served_eval --model adult --data ../shared/data/rsna --split test \\
        --output runs/served/adult.md

Probabilities come back rounded to 6 decimals: AUC and the decisions at the served threshold are what a client
gets. Films the population check refuses (422) are counted, and the metrics are given on the answered films and,
with `population_check: warn` semantics, cannot be given on the refused ones (their answer is not returned).
"""

from __future__ import annotations

import argparse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cxr.client import Client, PredictionError
from cxr.commands import command_parser
from cxr.data import image_files
from cxr.metrics import classification_report
from cxr.report import table, write_markdown_and_json


def ask(client: Client, model: str, path: Path) -> dict[str, Any]:
    try:
        return {"answer": client.predict(path.read_bytes(), model=model)}
    except PredictionError as refused:
        return {"status": refused.status, "reason": (refused.details or {}).get("error", refused.message)}


def evaluate(client: Client, model: str, folder: Path, threads: int = 4) -> dict[str, Any]:
    """Every film under folder/<CLASS>/ through the served `model`; metrics on the answered ones."""
    films = [(path, path.parent.name) for path in image_files(folder, "*/*")]
    with ThreadPoolExecutor(threads) as pool:
        results = list(tqdm(pool.map(lambda film: ask(client, model, film[0]), films), total=len(films),
                            desc=f"{model} via TorchServe"))
    answered = [(label, result["answer"]) for (_, label), result in zip(films, results, strict=True)
                if "answer" in result]
    refused = Counter(f"{result['status']} {result['reason']}" for result in results if "answer" not in result)
    served_labels = Counter(answer["label"] for _, answer in answered)
    by_folder: dict[str, Counter] = {}
    for (_, label), result in zip(films, results, strict=True):
        by_folder.setdefault(label, Counter())[result["answer"]["label"] if "answer" in result else "refused"] += 1
    counts = {"films": len(films), "answered": len(answered), "refused": dict(refused),
              "labels_answered": dict(served_labels),
              "by_folder": {label: dict(outcomes) for label, outcomes in sorted(by_folder.items())}}
    if not answered:
        return counts
    version, threshold = answered[0][1]["version"], answered[0][1]["threshold"]
    [described] = client.describe(model, version, customized=True)  # the handler's classes and positive class
    served = described.get("customizedMetadata") or {}
    class_names, positive_class = list(served["class_names"]), served.get("positive_class")
    if any(label not in class_names for label, _ in answered):  # another data set's classes: counts only
        return counts
    labels = np.array([class_names.index(label) for label, _ in answered])
    probabilities = np.array([[answer["probabilities"][name] for name in class_names] for _, answer in answered])
    positive = class_names.index(positive_class) if positive_class else None
    report = classification_report(labels, probabilities, class_names, positive_index=positive, threshold=threshold)
    return {**counts, "threshold": threshold, "version": version, "report": report}


def markdown(model: str, folder: Path, result: dict[str, Any]) -> str:
    lines = [f"# `{model}` through TorchServe on {folder}", "",
             f"{result['films']} films sent; {result['answered']} answered; refused: "
             f"{', '.join(f'{k}: {v}' for k, v in result['refused'].items()) or 'none'}; labels answered: "
             f"{', '.join(f'{k} {v}' for k, v in result['labels_answered'].items()) or 'none'}.", ""]
    outcomes = sorted({outcome for row in result["by_folder"].values() for outcome in row} - {"refused"}) + ["refused"]
    rows = [[label, sum(row.values()), *(row.get(outcome, 0) for outcome in outcomes)]
            for label, row in result["by_folder"].items()]
    lines += [*table(["folder", "films", *outcomes], rows), ""]
    if "report" in result:
        report = result["report"]
        lines += [f"Version {result['version']}, threshold {result['threshold']}.", "",
                  *table(["metric", "value", "95% CI (bootstrap)"])]
        for key in ("roc_auc", "macro_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy"):
            if key in report:
                low, high = report.get("ci95", {}).get(key, (float("nan"), float("nan")))
                lines.append(f"| {key} | {report[key]:.4f} | {low:.4f} - {high:.4f} |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="ImageFolder root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--key-file", default="logs/serve/key_file.json")
    parser.add_argument("--port", default=8080, type=int)
    parser.add_argument("--threads", default=4, type=int, help="requests in flight")
    parser.add_argument("--output", required=True, help="Markdown report (a .json beside it)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    client = Client.from_key_file(args.key_file, ports={"inference": args.port})
    folder = Path(args.data) / args.split
    try:
        result = evaluate(client, args.model, folder, args.threads)
    finally:
        client.close()
    print(write_markdown_and_json(args.output, markdown(args.model, folder, result), result).read_text())
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
