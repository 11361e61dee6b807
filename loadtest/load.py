"""Load generation against a loopback HTTP endpoint: closed loop (maximum throughput), open loop (latency at
a fixed offered rate, no coordinated omission), one latency summary, and process memory."""

from __future__ import annotations

import concurrent.futures
import http.client
import threading
import time
from typing import Any

import numpy as np


class Target:
    """Where the load goes: loopback host, port, path and headers."""

    def __init__(self, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port, self.path, self.headers = "127.0.0.1", port, path, headers

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def send(self, connection: http.client.HTTPConnection, body: bytes
             ) -> tuple[int, bool, http.client.HTTPConnection]:
        """(HTTP status or 0 for a connection error, success = a 200 with a label, the connection to reuse)."""
        try:
            connection.request("POST", self.path, body=body, headers=self.headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.status == 200 and b'"label"' in data, connection
        except (OSError, http.client.HTTPException):
            connection.close()
            return 0, False, self.connection()


def closed_loop(target: Target, payloads: list[bytes], concurrency: int, seconds: float,
                max_requests: int = 100_000) -> dict[str, Any]:
    """`concurrency` clients, each sending the next request when its answer arrives: the maximum throughput."""
    records: list[tuple[float, bool, int]] = []
    lock, stop_at = threading.Lock(), time.perf_counter() + seconds

    def client(offset: int) -> None:
        connection, index = target.connection(), offset
        while time.perf_counter() < stop_at:
            with lock:
                if len(records) >= max_requests:
                    break
            started = time.perf_counter()
            status, ok, connection = target.send(connection, payloads[index % len(payloads)])
            index += 1
            with lock:
                records.append((time.perf_counter() - started, ok, status))
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k * 7,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _summarise_records(records, time.perf_counter() - started)


def open_loop(target: Target, payloads: list[bytes], rate: float, seconds: float, pool_size: int = 48
              ) -> dict[str, Any]:
    """Requests issued at a fixed rate whatever the server does; latency counts from the scheduled send time,
    so a server that falls behind shows it (no coordinated omission)."""
    local = threading.local()
    records: list[tuple[float, bool, int]] = []
    lock = threading.Lock()

    def send(scheduled: float, body: bytes) -> None:
        if not hasattr(local, "connection"):
            local.connection = target.connection()
        status, ok, local.connection = target.send(local.connection, body)
        with lock:
            records.append((time.perf_counter() - scheduled, ok, status))

    count = int(rate * seconds)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=pool_size) as pool:
        for index in range(count):
            scheduled = started + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, scheduled, payloads[index % len(payloads)])
    return {**_summarise_records(records, time.perf_counter() - started), "offered_rate": rate}


def summarise(latencies_ms: np.ndarray, ok: np.ndarray, elapsed: float, statuses: list[int] | None = None
              ) -> dict[str, Any]:
    """The one latency summary (bench, drills, Locust runs). Percentiles are over the successful requests;
    `throughput` counts those per second, `requests_per_s` all of them."""
    latencies_ms, ok = np.asarray(latencies_ms, dtype=float), np.asarray(ok, dtype=bool)
    good = latencies_ms[ok] if ok.any() else np.array([np.nan])
    p50, p95, p99 = np.percentile(good, [50, 95, 99])
    failed = latencies_ms[~ok]
    counts: dict[str, int] = {}
    for status in statuses or []:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return {"requests": int(len(latencies_ms)), "failures": int((~ok).sum()), "seconds": elapsed,
            "throughput": float(ok.sum() / elapsed) if elapsed else 0.0,
            "requests_per_s": float(len(latencies_ms) / elapsed) if elapsed else 0.0,
            "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "statuses": counts,
            "failed_p50_ms": float(np.median(failed)) if len(failed) else None}


def _summarise_records(records: list[tuple[float, bool, int]], elapsed: float) -> dict[str, Any]:
    """records: (seconds, ok, HTTP status or 0 for a connection error) per request."""
    return summarise(np.array([r[0] for r in records], dtype=float) * 1000, np.array([r[1] for r in records], bool),
                     elapsed, [r[2] for r in records])


def rss_mb(pids: list[int]) -> list[float]:
    import psutil

    values = []
    for pid in pids:
        try:
            values.append(psutil.Process(pid).memory_info().rss / 2**20)
        except psutil.Error:
            values.append(float("nan"))
    return values
