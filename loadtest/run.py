"""`make loadtest`: Locust headless against the running server, reports in a git-ignored folder, one summary line.

    python -m loadtest.run --duration 60 --users 8 --protocol rest --model pneumonia

Writes to --out (default logs/loadtest/<protocol>-<model>-<time>/): Locust's CSV files and HTML report,
`latencies.csv` (every request), `latency_histogram.png`, `summary.json`; prints
`rest pneumonia: 51.2 req/s, p50 140 ms, p95 280 ms, p99 350 ms, failures 0/3072`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cxr.commands import command_parser
from cxr.paths import samples_dir
from cxr.report import figure
from loadtest.load import summarise

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def plot_histogram(latencies_ms: np.ndarray, summary: dict[str, float], path: Path, title: str) -> None:
    with figure(path, figsize=(6.4, 3.6)) as axes:
        axes.hist(latencies_ms, bins=60, color="#3b6ea8")
        for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            axes.axvline(summary[key], color="black", linestyle=style, label=f"{key[:3]} {summary[key]:.0f} ms")
        axes.set(xlabel="latency (ms)", ylabel="requests", title=title)
        axes.legend()


def summary_line(protocol: str, model: str, summary: dict[str, float]) -> str:
    return (f"{protocol} {model}: {summary['requests_per_s']:.1f} req/s, p50 {summary['p50_ms']:.0f} ms, "
            f"p95 {summary['p95_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms, "
            f"failures {summary['failures']}/{summary['requests']}")


def main(args: argparse.Namespace) -> dict[str, float]:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO / "logs" / "loadtest" / f"{args.protocol}-{args.model.replace('/', '_')}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    latency_log = out / "latencies.csv"
    latency_log.unlink(missing_ok=True)
    user_class = {"rest": "RestUser", "grpc": "GrpcUser"}[args.protocol]
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s", "--stop-timeout", "30",
        "--host", f"http://{args.host}:{args.port}", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
        "--model", args.model, "--grpc-port", str(args.grpc_port), "--key-file", args.key_file,
        "--samples", args.samples, "--latency-log", str(latency_log), "--max-requests", str(args.max_requests),
        "--loglevel", "WARNING", user_class,
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.duration + 120)
    if not latency_log.exists():
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
        raise SystemExit(f"Locust recorded no request (exit {completed.returncode}); is the server up (make serve)?")
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-2000:])
        print(f"warning: Locust exited with {completed.returncode} (see above)")
    rows = np.loadtxt(latency_log, delimiter=",", usecols=(1, 2), ndmin=2)
    latencies, ok = rows[:, 0], rows[:, 1].astype(bool)
    summary = summarise(latencies, ok, args.duration)
    failures_csv = out / "locust_failures.csv"
    summary.update(protocol=args.protocol, model=args.model, users=args.users, duration_s=args.duration,
                   failure_reasons=failures_csv.read_text().splitlines()[1:6] if failures_csv.exists() else [])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_histogram(latencies, summary, out / "latency_histogram.png",
                   f"{args.protocol} {args.model}, {args.users} users, {args.duration} s")
    print(summary_line(args.protocol, args.model, summary))
    print(f"reports: {out}/ (report.html, locust_stats.csv, latency_histogram.png, summary.json)")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = command_parser(__doc__)
    parser.add_argument("--duration", type=int, default=60, help="seconds")
    parser.add_argument("--users", type=int, default=8, help="concurrent users (each sends back to back)")
    parser.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    parser.add_argument("--protocol", choices=["rest", "grpc"], default="rest")
    parser.add_argument("--model", default="pneumonia")
    parser.add_argument("--host", default="127.0.0.1", help="loopback only; anything else is refused")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=7070)
    parser.add_argument("--key-file", default=str(REPO / "logs" / "serve" / "key_file.json"))
    parser.add_argument("--samples", default=str(samples_dir()))
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--out", default=None, help="report folder (default: logs/loadtest/<run>/)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
