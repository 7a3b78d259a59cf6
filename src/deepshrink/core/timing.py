"""Wall-clock timing of repeated calls: the one loop every latency number comes from."""
from __future__ import annotations

import time
from typing import Any, Callable


def time_calls(fn: Callable[[Any], object], x: Any, *, runs: int, warmup: int) -> list[float]:
    """Per-call wall times in milliseconds of ``fn(x)``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return times
