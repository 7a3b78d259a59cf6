"""Wall-clock timing of repeated calls: the one loop every latency number comes from.

Several calls are timed interleaved (A B C A B C ..., or in rounds of a block of calls each), which
spreads machine noise evenly over them, so their ratios hold even when absolute times drift (see
../shared/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

import torch


ROUNDS = 10   # a comparison's rounds: enough to spread drift over every file, each round long enough to warm it


def steady_block(runs: int) -> int:
    """The block of ``time_calls`` that times ``runs`` calls of each file in ``ROUNDS`` rounds:
    each file's steady state (what ``deepshrink evaluate`` of one file measures), still interleaved."""
    return max(1, runs // ROUNDS)


def time_calls(calls: Sequence[Callable[[], object]], *, runs: int, warmup: int, block: int = 1) -> list[list[float]]:
    """Per call, ``runs`` wall times in milliseconds, after ``warmup`` untimed calls of each, the
    calls interleaved in rounds of ``block`` calls each: ``block=1`` is A B C A B C (every call
    finds the caches as the other files left them), ``block=100`` is 100 A, 100 B, 100 C, then
    again (a model called in a loop, as a camera or audio stream calls it: its steady state)."""
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    clock = time.perf_counter
    for start_of_round in range(0, runs, block):
        for i, call in enumerate(calls):
            for _ in range(min(block, runs - start_of_round)):
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
