"""`make drills`: reliability drills against a TorchServe of our own (free loopback ports, the shipped archive
and settings), each bounded in time and load, each printing its counts; results in docs/reliability.md.

    python -m loadtest.drills                       # full: 10-minute soak, then crash, overload, malformed storm
    python -m loadtest.drills --short               # seconds each (what `make test` runs)

- soak: 80% of the measured maximum throughput for --soak-seconds; goal 0 failures, RSS growth < 10%.
- worker crash: kill -9 the worker under load; TorchServe restarts it; time to recovery (goal <= 30 s) and
  the failed requests (goal: only those in flight).
- overload: 3x the maximum; the server sheds with fast 503s (bounded queue: job_queue_size), no hang, and
  answers normally once the load drops.
- malformed input storm: --storm bad payloads of many kinds mixed with good ones; every bad one a 4xx,
  every good one a 200, the worker never restarts, the server healthy after.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from cxr.commands import command_parser
from cxr.report import table, write_markdown_and_json
from cxr_core.variants import VARIANTS
from export import archive as archive_cli
from loadtest import hostile
from loadtest.bench_server import BenchServer, add_server_arguments, read_payloads
from loadtest.load import closed_loop, open_loop, rss_mb

REPO = Path(__file__).resolve().parent.parent


def bad_payloads(good: bytes, count: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) of many kinds of bad input, cycling to `count`."""
    rng = np.random.default_rng(seed)
    tiny, wide, gif, bomb_png = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("L", (20, 20), 128).save(tiny, format="PNG")
    Image.new("L", (1000, 100), 128).save(wide, format="PNG")
    Image.new("L", (100, 100), 128).save(gif, format="GIF")
    Image.new("1", (8000, 8000)).save(bomb_png, format="PNG")  # 64 Mpx in a few KB: a decompression bomb
    photo = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 300, 3)).astype(np.uint8)).save(photo, format="JPEG")
    kinds = [
        ("empty", b"", "image/jpeg"),
        ("text", b"this is not an image", "image/jpeg"),
        ("truncated", good[: len(good) // 3], "image/jpeg"),
        ("random bytes", rng.integers(0, 256, 5000).astype(np.uint8).tobytes(), "application/octet-stream"),
        ("too small", tiny.getvalue(), "image/png"),
        ("wrong shape", wide.getvalue(), "image/png"),
        ("gif", gif.getvalue(), "image/gif"),
        ("decompression bomb", bomb_png.getvalue(), "image/png"),
        ("bad base64 json", b'{"image": "@@@not base64@@@"}', "application/json"),
        ("json without image", b'{"hello": 1}', "application/json"),
        ("noise photo", photo.getvalue(), "image/jpeg"),
    ]
    # Binary bodies labelled as form data are left out: TorchServe's frontend may answer them 500 before any
    # handler runs (see README, "curl --data-binary"); the handler refuses the ones that reach it with a 415.
    return [kinds[i % len(kinds)] for i in range(count)]


def hostile_payloads(count: int) -> list[tuple[str, bytes, str]]:
    """The hostile corpus (loadtest/hostile.py: decode bombs and CPU traps), cycling to `count`."""
    built = [(name, body, content_type) for name, (body, content_type) in hostile.corpus().items()]
    return [built[i % len(built)] for i in range(count)]


def storm(bench: BenchServer, model: str, good: list[bytes], bad: list[tuple[str, bytes, str]],
          concurrency: int = 12) -> dict[str, Any]:
    """`bad` payloads mixed with a quarter as many good X-rays: the statuses each kind got, whether a worker
    restarted and how much the workers' peak memory grew."""
    import http.client

    key = bench.keys["inference"]
    jobs = [(kind, body, ctype, False) for kind, body, ctype in bad]
    jobs += [("good", good[i % len(good)], "image/jpeg", True) for i in range(len(bad) // 4)]
    np.random.default_rng(1).shuffle(jobs)
    pids_before = bench_worker_pids(bench, model)
    baselines = hostile.reset_peaks(pids_before)

    def send(job: tuple[str, bytes, str, bool]) -> tuple[str, bool, int]:
        kind, body, content_type, is_good = job
        connection = http.client.HTTPConnection("127.0.0.1", bench.ports["inference"], timeout=60)
        try:
            connection.request("POST", f"/predictions/{model}", body=body,
                               headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            connection.close()
        return kind, is_good, status

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(send, jobs))
    by_kind: dict[str, dict[str, int]] = {}
    for kind, _, status in results:
        by_kind.setdefault(kind, {})
        by_kind[kind][str(status)] = by_kind[kind].get(str(status), 0) + 1
    bad_ok = sum(1 for _, is_good, status in results if not is_good and 400 <= status < 500)
    good_ok = sum(1 for _, is_good, status in results if is_good and status == 200)
    pids_after = bench_worker_pids(bench, model)
    return {"bad": sum(1 for job in jobs if not job[3]), "bad_got_4xx": bad_ok,
            "good": sum(1 for job in jobs if job[3]), "good_got_200": good_ok, "by_kind": by_kind,
            "worker_restarted": pids_after != pids_before, "healthy_after": healthy(bench),
            "peak_growth_mb": hostile.peak_growth_mb(pids_after, baselines)}


def bench_worker_pids(bench: BenchServer, model: str) -> list[int]:
    return sorted(worker["pid"] for worker in bench.client.describe(model)[0]["workers"])


def healthy(bench: BenchServer) -> bool:
    try:
        return bench.client.ping() == "Healthy"
    except Exception:  # noqa: BLE001 - any failure means not healthy
        return False


def soak(bench: BenchServer, model: str, payloads: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    pids = [bench.frontend_pid(), *bench_worker_pids(bench, model)]
    samples = [(0.0, sum(rss_mb(pids)))]
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(open_loop(bench.target(model), payloads, rate, seconds)))
    started = time.perf_counter()
    runner.start()
    while runner.is_alive():
        runner.join(timeout=min(10.0, max(seconds / 10, 0.5)))
        samples.append((time.perf_counter() - started, sum(rss_mb(pids))))
    # Growth: the last third's mean over the first third's (after warm-up), robust to single spikes.
    values = np.array([rss for _, rss in samples[1:]])
    third = max(len(values) // 3, 1)
    growth = float(values[-third:].mean() / values[:third].mean() - 1) if len(values) >= 2 else 0.0
    return {**result, "rate": rate, "rss_mb_start": samples[1][1] if len(samples) > 1 else samples[0][1],
            "rss_mb_end": samples[-1][1], "rss_growth": growth, "rss_samples": samples}


def worker_crash(bench: BenchServer, model: str, payloads: list[bytes], concurrency: int, seconds: float,
                 recovery_timeout: float = 120.0) -> dict[str, Any]:
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(
        closed_loop(bench.target(model), payloads, concurrency, seconds)))
    runner.start()
    time.sleep(seconds / 4)
    [victim] = bench_worker_pids(bench, model)[:1]
    killed_at = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    recovery = None
    while time.perf_counter() - killed_at < recovery_timeout:
        workers = bench.client.describe(model)[0]["workers"]
        if workers and all(w["status"] == "READY" for w in workers) and victim not in [w["pid"] for w in workers]:
            recovery = time.perf_counter() - killed_at
            break
        time.sleep(0.2)
    runner.join()
    return {**result, "killed_pid": victim, "recovery_s": recovery, "concurrency": concurrency}


def overload(bench: BenchServer, model: str, payloads: list[bytes], peak: float, seconds: float) -> dict[str, Any]:
    heavy = open_loop(bench.target(model), payloads, 3 * peak, seconds, pool_size=256)
    time.sleep(2)
    after = open_loop(bench.target(model), payloads, 0.5 * peak, max(seconds / 2, 3))
    return {"at_3x": heavy, "after_at_half": after}


def markdown(results: dict[str, Any]) -> str:
    s, c, o, m, h = results["soak"], results["crash"], results["overload"], results["storm"], results["hostile"]
    heavy, after = o["at_3x"], o["after_at_half"]
    shed = heavy["statuses"].get("503", 0)
    lines = ["# Reliability drills", "",
             f"Written by `make drills` on {results['machine']}: one TorchServe of our own with "
             f"the shipped default archive and settings, the load generator on the same machine, loopback only. "
             f"Workers: {results.get('workers', 1)}. Maximum throughput measured first: **{results['peak']:.1f} "
             f"X-rays/s** ({results['concurrency']} clients).", "",
             *table(["drill", "goal", "measured", ""]),
             f"| soak: {s['seconds'] / 60:.1f} min at 80% of max ({s['rate']:.1f}/s) | 0 failures, RSS growth < 10% | "
             f"{s['failures']} failures of {s['requests']}; p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; RSS "
             f"{s['rss_mb_start']:.0f} -> {s['rss_mb_end']:.0f} MB ({s['rss_growth']:+.1%}) | "
             f"{'met' if s['failures'] == 0 and s['rss_growth'] < 0.10 else 'not met'} |",
             f"| worker crash: kill -9 under load ({c['concurrency']} clients) | recovery <= 30 s, only in-flight "
             f"requests fail | recovered in {c['recovery_s']:.1f} s; {c['failures']} failed of {c['requests']} "
             f"(statuses {c['statuses']}) | {'met' if c['recovery_s'] is not None and c['recovery_s'] <= 30 and c['failures'] <= c['concurrency'] else 'not met'} |",  # noqa: E501
             f"| overload: 3x max ({heavy['offered_rate']:.0f}/s) for {heavy['seconds']:.0f} s | fast 503s, no hang, "
             f"recovers | {shed} shed with 503 (median {heavy['failed_p50_ms'] or 0:.0f} ms), {heavy['requests'] - heavy['failures']} "  # noqa: E501
             f"answered (p50 {heavy['p50_ms']:.0f} ms), statuses {heavy['statuses']}; then at 50%: {after['failures']} "
             f"failures, p50 {after['p50_ms']:.0f} ms | "
             f"{'met' if after['failures'] == 0 and heavy['statuses'].get('0', 0) == 0 else 'not met'} |",
             f"| malformed storm: {m['bad']} bad + {m['good']} good | every bad a 4xx, every good a 200, healthy after "
             f"| {m['bad_got_4xx']}/{m['bad']} bad got a 4xx, {m['good_got_200']}/{m['good']} good got a 200; worker "
             f"restarted: {m['worker_restarted']}; healthy after: {m['healthy_after']} | "
             f"{'met' if m['bad_got_4xx'] == m['bad'] and m['good_got_200'] == m['good'] and m['healthy_after'] else 'not met'} |",  # noqa: E501
             f"| hostile storm (loadtest/hostile.py): {h['bad']} decode bombs and CPU traps + {h['good']} good | "
             f"every one a 4xx, every good a 200, no restart, worker peak memory +300 MB at most | "
             f"{h['bad_got_4xx']}/{h['bad']} got a 4xx, {h['good_got_200']}/{h['good']} good got a 200; worker "
             f"restarted: {h['worker_restarted']}; peak +{h['peak_growth_mb']} MB | "
             f"{'met' if h['bad_got_4xx'] == h['bad'] and h['good_got_200'] == h['good'] and not h['worker_restarted'] and h['peak_growth_mb'] <= 300 else 'not met'} |",  # noqa: E501
             "", "Statuses per kind of bad payload:", "", "```", json.dumps(m["by_kind"], indent=1),
             json.dumps(h["by_kind"], indent=1), "```", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    payloads = read_payloads(args.samples)
    if args.short:
        args.soak_seconds, args.seconds, args.storm, args.hostile = 8, 6, 60, 14
    export_dir = Path(args.export_dir)
    variant = args.variant or archive_cli.fastest_exact_variant(export_dir)
    results: dict[str, Any] = {"machine": args.machine or f"{os.cpu_count()} CPU cores",
                               "date": time.strftime("%Y-%m-%d"), "concurrency": args.concurrency}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        store.mkdir()
        staged = archive_cli.stage_serving_code(scratch / "extra", Path(args.gate) if args.gate else None)
        # The population check warns instead of refusing: every sample X-ray must be a 200 for the drill counts.
        model_config = yaml.safe_load(Path(args.model_config).read_text())
        model_config["handler"] = {**model_config.get("handler", {}), "population_check": "warn"}
        (scratch / "model-config.yaml").write_text(yaml.safe_dump(model_config))
        archive_cli.build_archive(export_dir / VARIANTS[variant].file_name, "drill", "1.0", store, staged,
                                  scratch / "model-config.yaml")
        bench = BenchServer(scratch / "serve", store)
        try:
            results["workers"] = bench.register("drill")
            closed_loop(bench.target("drill"), payloads, args.concurrency, 3)
            results["peak"] = closed_loop(bench.target("drill"), payloads, args.concurrency, args.seconds)["throughput"]
            print(f"max throughput {results['peak']:.1f}/s", flush=True)
            results["soak"] = soak(bench, "drill", payloads, 0.8 * results["peak"], args.soak_seconds)
            print(f"soak: {results['soak']['failures']} failures, RSS {results['soak']['rss_growth']:+.1%}", flush=True)
            results["crash"] = worker_crash(bench, "drill", payloads, args.concurrency, max(args.seconds * 3, 20),
                                            args.recovery_timeout)
            print(f"crash: recovery {results['crash']['recovery_s']} s, {results['crash']['failures']} failed",
                  flush=True)
            results["overload"] = overload(bench, "drill", payloads, results["peak"], args.seconds)
            print(f"overload: statuses {results['overload']['at_3x']['statuses']}", flush=True)
            results["storm"] = storm(bench, "drill", payloads, bad_payloads(payloads[0], args.storm))
            print(f"storm: {results['storm']['bad_got_4xx']}/{results['storm']['bad']} bad -> 4xx, "
                  f"{results['storm']['good_got_200']}/{results['storm']['good']} good -> 200", flush=True)
            results["hostile"] = storm(bench, "drill", payloads, hostile_payloads(args.hostile))
            print(f"hostile storm: {results['hostile']['bad_got_4xx']}/{results['hostile']['bad']} -> 4xx, "
                  f"worker peak +{results['hostile']['peak_growth_mb']} MB", flush=True)
        finally:
            bench.close()
    if args.output:
        print(f"report: {write_markdown_and_json(args.output, markdown(results), results)}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = add_server_arguments(command_parser(__doc__), output="runs/reports/reliability.md")
    parser.add_argument("--variant", default=None, help="default: the one make archive ships")
    parser.add_argument("--model-config", default=str(archive_cli.DEFAULT_MODEL_CONFIG),
                        help="model-config.yaml of the drill archive (workers, batching, startup timeout)")
    parser.add_argument("--recovery-timeout", type=float, default=120.0,
                        help="seconds to wait for a killed worker's replacement")
    parser.add_argument("--seconds", type=float, default=15.0, help="per load phase")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--storm", type=int, default=1000, help="bad payloads in the storm")
    parser.add_argument("--hostile", type=int, default=140, help="hostile payloads in the hostile storm")
    parser.add_argument("--short", action="store_true", help="seconds, not minutes (the make test version)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
