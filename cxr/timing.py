"""Throughput measured as the median of repeated runs, for side-by-side comparisons in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def images_per_second(predict: Callable[[Any], Any], batch: Any, batch_size: int, repeats: int = 7,
                      warmup: int = 2, min_seconds: float = 0.0) -> float:
    """Median images/s of `predict(batch)` over at least `repeats` timed calls (and as many more as fit in
    `min_seconds`), after `warmup` untimed ones."""
    for _ in range(warmup):
        predict(batch)
    timings = []
    deadline = time.perf_counter() + min_seconds
    while len(timings) < repeats or time.perf_counter() < deadline:
        started = time.perf_counter()
        predict(batch)
        timings.append(time.perf_counter() - started)
    return batch_size / statistics.median(timings)
