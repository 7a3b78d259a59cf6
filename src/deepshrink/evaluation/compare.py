"""Several artifacts measured in one run, their latencies interleaved (``core.timing``)."""
from __future__ import annotations

from deepshrink.core.timing import steady_block, torch_threads
from deepshrink.evaluation.metrics import interleaved_latency


def evaluate_many(
    artifacts: dict[str, object], test, *, threads: int = 1, latency_runs: int = 200, warmup: int = 20,
    reference: object | None = None, fidelity: str | None = None, metric=None, latency_block: int | None = None,
) -> dict[str, "Metrics"]:
    """``evaluate`` for several artifacts, with their latencies measured interleaved in one run, in
    rounds of ``latency_block`` calls of each (``core.timing.time_calls``; ``None``: ``steady_block``,
    ten rounds, so each file is timed in its steady state as ``evaluate`` times one file; ``1``: call
    by call, each call finding the caches as the other files left them), and their fidelity to
    ``reference`` (the fp32 model) computed from one pass of the reference."""
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
    with torch_threads(threads):
        calls = [r.call_for(x1) if latency_runs else None for r in runners.values()]
        block = steady_block(latency_runs) if latency_block is None else latency_block
        latencies = interleaved_latency(calls, runs=latency_runs, warmup=warmup, block=block)
    return {label: Metrics(**infos[label], **lat) for label, lat in zip(runners, latencies)}
