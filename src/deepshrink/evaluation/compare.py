"""Latency of several runners measured in one run, interleaved (A B C A B C ...).

Interleaving spreads machine noise evenly over the variants, so their ratios hold even when
absolute milliseconds drift (see ../shared/BENCHMARKS.md).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from deepshrink.evaluation.metrics import percentile


def interleaved_latency(
    predictors: Sequence[Callable[[object], object]], x, *, runs: int, warmup: int
) -> list[dict[str, float]]:
    """Per predictor: median and p90 of ``runs`` batch-``len(x)`` calls, in milliseconds."""
    for predict in predictors:
        for _ in range(warmup):
            predict(x)
    times: list[list[float]] = [[] for _ in predictors]
    for _ in range(runs):
        for i, predict in enumerate(predictors):
            start = time.perf_counter()
            predict(x)
            times[i].append((time.perf_counter() - start) * 1e3)
    return [
        {"latency_ms_median": statistics.median(t), "latency_ms_p90": percentile(t, 0.9), "latency_runs": len(t)} if t else
        {"latency_ms_median": None, "latency_ms_p90": None, "latency_runs": 0}
        for t in times
    ]


def evaluate_many(
    artifacts: dict[str, object], test, *, threads: int = 1, latency_runs: int = 200, warmup: int = 20,
    reference: object | None = None, fidelity: str | None = None, metric=None,
) -> dict[str, "Metrics"]:
    """``evaluate`` for several artifacts, with their latencies measured interleaved in one run and
    their fidelity to ``reference`` (the fp32 model) computed from one pass of the reference."""
    from deepshrink.core import samples as S
    from deepshrink.evaluation.metrics import Metrics, describe, eval_batches, run_outputs
    from deepshrink.evaluation.runners import open_runner

    runners = {label: open_runner(a, threads=threads) for label, a in artifacts.items()}
    reference_outputs = None
    if reference is not None:
        reference_outputs = run_outputs(open_runner(reference, threads=threads), eval_batches(test)[0])
    infos = {label: describe(artifacts[label], r, test, label=label, reference_outputs=reference_outputs,
                             fidelity_kind=fidelity, metric=metric) for label, r in runners.items()}
    x1 = S.stack([test[0][0]])
    latencies = interleaved_latency([r.predict for r in runners.values()], x1, runs=latency_runs, warmup=warmup)
    return {label: Metrics(**infos[label], **lat) for label, lat in zip(runners, latencies)}
