"""Wall-clock timing of repeated calls: the one loop every latency number comes from.

Several calls are timed interleaved (A B C A B C ...), which spreads machine noise evenly over
them, so their ratios hold even when absolute times drift (see ../shared/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

import torch


def time_calls(calls: Sequence[Callable[[], object]], *, runs: int, warmup: int) -> list[list[float]]:
    """Per call, ``runs`` wall times in milliseconds, the calls interleaved, after ``warmup``
    untimed calls of each."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    clock = time.perf_counter
    for _ in range(runs):
        for i, call in enumerate(calls):
            start = clock()
            call()
            times[i].append((clock() - start) * 1e3)
    return times


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` for the block, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
