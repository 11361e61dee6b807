"""The benchmark report: plots, the ratios against the goals, and the Markdown written beside its data
(`benchmarks.json`, `benchmarks_matrix.json`; `python -m loadtest.bench --report-only` redraws from it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cxr.report import figure, table, write_markdown_and_json
from cxr_core.variants import VARIANTS
from loadtest.bench_server import BenchConfig


def plot(results: dict[str, Any], folder: Path) -> list[str]:
    """Throughput against batch size (model only per variant, end to end, naive) and latency against load."""
    with figure(folder / "bench_throughput.png", figsize=(6.4, 4)) as axes:
        for variant, values in results["model_only"].items():
            axes.plot(list(values), list(values.values()), marker="o",
                      label=f"{VARIANTS[variant].label} (model only)")
        shipped = results["e2e"][results["default_config"]]["config"]
        same_but_batch = ("variant", "delay_ms", "workers", "threads")  # the batch-size sweep of the shipped config
        batch_rows = {block["config"]["batch_size"]: block["max"]["throughput"] for block in results["e2e"].values()
                      if all(block["config"][key] == shipped[key] for key in same_but_batch)}
        if batch_rows:
            keys = sorted(batch_rows)
            axes.plot(keys, [batch_rows[k] for k in keys], marker="s", color="black",
                      label=f"{results['default_variant']} end to end (TorchServe)")
        axes.axhline(results["naive"]["max"]["throughput"], color="red", linestyle=":", label="naive FastAPI")
        axes.set(xlabel="batch size", ylabel="X-rays / s", title="Throughput vs batch size (2-core CPU)")
        axes.legend(fontsize=7)
    with figure(folder / "bench_latency.png", figsize=(6.4, 4)) as axes:
        for label, block, style in (("ours", results["e2e"][results["default_config"]], "-"),
                                    ("naive", results["naive"], "--")):
            shares = list(block["load"])
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                axes.plot(shares, [block["load"][s][key] for s in shares], marker="o", linestyle=style,
                          label=f"{label} {key[:3]}")
        axes.set(xlabel="offered load (share of each server's max throughput)", ylabel="latency (ms)",
                 title="Latency percentiles vs load", yscale="log")
        axes.legend(fontsize=7, ncol=2)
    return ["bench_throughput.png", "bench_latency.png"]


def ratios(results: dict[str, Any]) -> dict[str, float]:
    default = results["e2e"][results["default_config"]]
    model_limit = results["model_only"][results["default_variant"]][results["served_batch"]]
    at80 = default["load"]["80%"]
    baselines = [results["naive"], *([results["litserve"]] if "litserve" in results else [])]
    found = {"e2e_over_model_only": default["max"]["throughput"] / model_limit,
             "ours_over_naive": default["max"]["throughput"] / results["naive"]["max"]["throughput"],
             "p99_over_p50_at_80": at80["p99_ms"] / at80["p50_ms"],
             "failures": sum(block["max"]["failures"] + sum(v["failures"] for v in block.get("load", {}).values())
                             for block in [*results["e2e"].values(), *baselines])}
    if "litserve" in results:
        found["ours_over_litserve"] = default["max"]["throughput"] / results["litserve"]["max"]["throughput"]
        found["p99_over_litserve_p99"] = default["max"]["p99_ms"] / results["litserve"]["max"]["p99_ms"]
    return found


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    r = ratios(results)
    default = results["e2e"][results["default_config"]]
    title = ["# Benchmarks"]
    if results.get("matrix"):
        delay = re.search(r"_d(\d+)_", results["default_config"]).group(1)
        title = ["# Benchmarks: the whole matrix", "",
                 "Every archive and batch / delay / worker setting, each varied alone from the default of the run "
                 f"(`make bench-matrix`; maxBatchDelay {delay} ms except in the rows that vary it); the shipped "
                 "configuration alone, with its plots: [benchmarks.md](benchmarks.md)."]
    command = "make bench-matrix" if results.get("matrix") else "make bench"
    lines = [*title, "",
             f"Written by `{command}` on {results['machine']}; the load generator runs on the same machine. "
             f"Images: the {results['images']} original-resolution X-rays of `samples/` in the data "
             "root. "
             f"Closed loop: {results['concurrency']} clients back to back for {results['seconds']:.0f} s; open loop: "
             "fixed rates at 50/80/100% of that maximum.", "",
             "## Against the goals", "", *table(["goal", "measured", ""]),
             f"| end to end >= 0.8x model-only ({results['default_variant']}, batch {results['served_batch']}) | "
             f"**{r['e2e_over_model_only']:.2f}x** | {'met' if r['e2e_over_model_only'] >= 0.8 else 'not met'} |",
             f"| >= 2x the naive FastAPI baseline | **{r['ours_over_naive']:.2f}x** | "
             f"{'met' if r['ours_over_naive'] >= 2 else 'not met'} |",
             *([f"| >= 1.0x a hand-rolled LitServe + ONNX Runtime server on the same model, p99 no worse | "
                f"**{r['ours_over_litserve']:.2f}x**, p99 {r['p99_over_litserve_p99']:.2f}x its | "
                f"{'met' if r['ours_over_litserve'] >= 1 and r['p99_over_litserve_p99'] <= 1 else 'not met'} |"]
               if "ours_over_litserve" in r else []),
             f"| p99 <= 2x p50 at 80% of max load | **{r['p99_over_p50_at_80']:.2f}x** | "
             f"{'met' if r['p99_over_p50_at_80'] <= 2 else 'not met'} |",
             f"| no failures | {r['failures']} | {'met' if r['failures'] == 0 else 'not met'} |", "",
             f"## Model only (images/s, {results['model_threads']} threads: the cores the server's workers use "
             "together)", "",
             "| backend | " + " | ".join(f"batch {b}" for b in results["batches"]) + " |",
             "|---|" + "---|" * len(results["batches"])]
    for variant, values in results["model_only"].items():
        cells = " | ".join(f"{values[b]:.1f}" for b in results["batches"])
        lines.append(f"| {VARIANTS[variant].label} | {cells} |")
    lines += ["", "## End to end through TorchServe (closed loop: maximum throughput)", "",
              "| archive, batch size, max delay (ms), workers x threads | X-rays/s | p50 ms | p95 ms | p99 ms | "
              "failures | RSS frontend / workers (MB) | vs model only |", "|---|---|---|---|---|---|---|---|"]
    for name, block in results["e2e"].items():
        config = BenchConfig(**block["config"])
        limit = results["model_only"].get(config.variant, {}).get(config.batch_size)
        m = block["max"]
        workers = " + ".join(f"{x:.0f}" for x in block["rss_mb"]["workers"])
        label = config.label
        lines.append(f"| {label}{' **(shipped)**' if name == results['default_config'] else ''} | "
                     f"{m['throughput']:.1f} | {m['p50_ms']:.0f} | {m['p95_ms']:.0f} | {m['p99_ms']:.0f} | "
                     f"{m['failures']}/{m['requests']} | {block['rss_mb']['frontend']:.0f} / {workers} | "
                     f"{(m['throughput'] / limit) if limit else float('nan'):.2f}x |")
    naive = results["naive"]
    lines += [f"| naive FastAPI + uvicorn, eager, one at a time | {naive['max']['throughput']:.1f} | "
              f"{naive['max']['p50_ms']:.0f} | {naive['max']['p95_ms']:.0f} | {naive['max']['p99_ms']:.0f} | "
              f"{naive['max']['failures']}/{naive['max']['requests']} | {naive['rss_mb']['app']:.0f} (one process) | |"]
    if "litserve" in results:
        lit = results["litserve"]["max"]
        lines.append(f"| hand-rolled LitServe + ONNX Runtime (batch 8 / 10 ms, 2 threads), same ONNX file | "
                     f"{lit['throughput']:.1f} | {lit['p50_ms']:.0f} | {lit['p95_ms']:.0f} | {lit['p99_ms']:.0f} | "
                     f"{lit['failures']}/{lit['requests']} | {results['litserve']['rss_mb']['app']:.0f} (all its "
                     "processes) | |")
    lines += ["", "## Latency under load (open loop)", "",
              *table(["server", "offered", "achieved X-rays/s", "p50 ms", "p95 ms", "p99 ms", "p99/p50", "failures"])]
    servers = [("ours (shipped config)", default), ("naive", naive)]
    servers += [("LitServe", results["litserve"])] if "litserve" in results else []
    for label, block in servers:
        for share, v in block["load"].items():
            lines.append(f"| {label} | {share} ({v['offered_rate']:.1f}/s) | {v['throughput']:.1f} | "
                         f"{v['p50_ms']:.0f} | {v['p95_ms']:.0f} | {v['p99_ms']:.0f} | "
                         f"{v['p99_ms'] / v['p50_ms']:.2f} | {v['failures']}/{v['requests']} |")
    profile, single = results["profile"], results["single"]
    handler_ms = sum(profile.values())
    lines += ["", "## One request, end to end (median ms, default archive, one client)", "",
              *table(["stage", "ms", "share"])]
    for key, value in profile.items():
        lines.append(f"| handler: {key.replace('_', ' ')} | {value:.2f} | {value / single['p50_ms']:.0%} |")
    rest = single["p50_ms"] - handler_ms
    lines += [f"| TorchServe: HTTP, frontend, queue, IPC to the worker (end to end minus the handler) | {rest:.2f} | "
              f"{rest / single['p50_ms']:.0%} |",
              f"| **end to end at concurrency 1** (p50; {single['throughput']:.1f} X-rays/s) | "
              f"**{single['p50_ms']:.2f}** | |"]
    lines += [""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def write_reports(results: dict[str, Any], output: Path) -> None:
    """`output` (Markdown) and its data beside it (`.json`); the plots for the shipped configuration's run
    (the whole matrix's report has none: they would overwrite them)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    plots = [] if results.get("matrix") else plot(results, output.parent)
    write_markdown_and_json(output, markdown(results, plots), results)
