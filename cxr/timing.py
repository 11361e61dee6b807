"""Throughput measured as the median of repeated runs, for side-by-side comparisons in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def images_per_second(predict: Callable[[Any], Any], batch: Any, batch_size: int, repeats: int = 7,
                      warmup: int = 2) -> float:
    """Median images/s of `predict(batch)` over `repeats` timed calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        predict(batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(batch)
        timings.append(time.perf_counter() - started)
    return batch_size / statistics.median(timings)
