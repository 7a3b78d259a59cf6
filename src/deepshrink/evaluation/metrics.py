"""``evaluate``: every number a claim needs, measured on the artifact in its own runtime."""
from __future__ import annotations

import gzip
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deepshrink.core.timing import time_calls
from deepshrink.evaluation.counting import count_macs, onnx_parameter_counts, parameter_counts
from deepshrink.evaluation.runners import EagerRunner, open_runner
from deepshrink.formats.sidecar import read_sidecar


@dataclass(frozen=True)
class Metrics:
    """What ``deepshrink evaluate`` reports. Sizes in bytes, latency in milliseconds per call.

    ``counts_source`` says where params/nonzero/macs came from: ``model`` (counted on the
    module), ``file`` (read from the ONNX initializers) or ``export`` (the sidecar written at
    export, for a .pte whose weights sit inside the XNNPACK blob).
    """

    artifact: str
    runtime: str
    accuracy: float
    test_samples: int
    params: int | None
    nonzero_params: int | None
    macs: int | None
    counts_source: str
    file_bytes: int | None
    gzip_bytes: int | None
    latency_ms_median: float | None
    latency_ms_p90: float | None
    threads: int
    latency_runs: int
    parity: list | None = None     # the export-time parity checks recorded in the sidecar (files only)

    def as_dict(self) -> dict:
        return asdict(self)


def measure_latency(predict, x: torch.Tensor, *, runs: int, warmup: int) -> list[float]:
    """Per-call wall times in ms of ``predict(x)`` after ``warmup`` untimed calls."""
    return time_calls(predict, x, runs=runs, warmup=warmup)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_accuracy(runner, dataset: Dataset, batch_size: int = 256) -> tuple[float, int]:
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += int((runner.predict(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1), total


def describe(artifact: nn.Module | str | os.PathLike, runner, test: Dataset, *, label: str | None = None) -> dict:
    """Everything but latency: accuracy in the runner's runtime, counts, and on-disk sizes."""
    accuracy, n = run_accuracy(runner, test)
    x1 = test[0][0].unsqueeze(0).contiguous()
    info: dict = {
        "artifact": label or (str(artifact) if not isinstance(artifact, nn.Module) else type(artifact).__name__),
        "runtime": runner.runtime, "accuracy": accuracy, "test_samples": n,
        "params": None, "nonzero_params": None, "macs": None, "counts_source": "model",
        "file_bytes": None, "gzip_bytes": None, "threads": runner.threads, "parity": None,
    }
    if isinstance(runner, EagerRunner):
        info["params"], info["nonzero_params"] = parameter_counts(runner.model)
        info["macs"] = count_macs(runner.model, x1)
    if not isinstance(artifact, nn.Module):
        path = Path(artifact)
        payload = path.read_bytes()
        info["file_bytes"], info["gzip_bytes"] = len(payload), len(gzip.compress(payload, 9))
        sidecar = read_sidecar(path) or {}
        info["parity"] = sidecar.get("parity")
        if path.suffix == ".onnx":
            info["params"], info["nonzero_params"] = onnx_parameter_counts(path)
            info["counts_source"] = "file"
        elif path.suffix == ".pte":
            info["params"], info["nonzero_params"] = sidecar.get("params"), sidecar.get("nonzero_params")
            info["counts_source"] = "export" if sidecar else "unknown"
        if info["macs"] is None:
            info["macs"] = sidecar.get("macs")
    return info


def evaluate(
    artifact: nn.Module | str | os.PathLike,
    test: Dataset,
    *,
    threads: int = 1,
    latency_runs: int = 200,
    warmup: int = 20,
    label: str | None = None,
) -> Metrics:
    """Accuracy on ``test``, counts, on-disk size and batch-1 latency of ``artifact``.

    ``artifact`` is a module (measured in eager PyTorch) or a ``.pte`` / ``.onnx`` / checkpoint
    file (measured in ExecuTorch, ONNX Runtime, or eager PyTorch after a safe load).
    """
    runner = open_runner(artifact, threads=threads)
    info = describe(artifact, runner, test, label=label)
    x1 = test[0][0].unsqueeze(0).contiguous()
    times = measure_latency(runner.predict, x1, runs=latency_runs, warmup=warmup) if latency_runs else []
    return Metrics(
        **info,
        latency_ms_median=statistics.median(times) if times else None,
        latency_ms_p90=percentile(times, 0.9) if times else None,
        latency_runs=len(times),
    )
