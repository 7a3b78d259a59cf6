"""``evaluate``: every number a claim needs, measured on the artifact in its own runtime."""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from deepshrink.core import samples as S
from deepshrink.core.progress import progress
from deepshrink.core.timing import time_calls, torch_threads
from deepshrink.data.splits import NO_LABEL
from deepshrink.evaluation.counting import count_macs, onnx_parameter_counts, parameter_counts
from deepshrink.evaluation.runners import EagerRunner, open_runner
from deepshrink.formats.download import download_bytes
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
    accuracy: float | None          # None without labels: see ``fidelity``
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
    fidelity: dict | None = None   # against the fp32 reference model, measured in this runtime (evaluation.fidelity)
    zstd_bytes: int | None = None  # the download: file bytes after zstd -19 (gzip_bytes: after gzip -9; formats.download)

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def interleaved_latency(calls: Sequence[Callable[[], object]], *, runs: int, warmup: int, block: int = 1) -> list[dict]:
    """Per call (``Runner.call_for``): median and p90 in ms of ``runs`` calls, timed interleaved in
    rounds of ``block`` calls (``core.timing.time_calls``)."""
    if runs <= 0:
        return [{"latency_ms_median": None, "latency_ms_p90": None, "latency_runs": 0} for _ in calls]
    return [
        {"latency_ms_median": statistics.median(t), "latency_ms_p90": percentile(t, 0.9), "latency_runs": len(t)}
        for t in time_calls(calls, runs=runs, warmup=warmup, block=block)
    ]


def eval_batches(dataset: Dataset, batch_size: int = 256) -> tuple[list, torch.Tensor]:
    """Input batches of ``dataset`` (consecutive samples of one shape per batch) and its labels in order."""
    items = [dataset[i] for i in range(len(dataset))]
    labels = torch.stack([torch.as_tensor(y, dtype=torch.int64).reshape(()) for _, y in items]) if items else torch.zeros(0)
    return list(S.batches([x for x, _ in items], batch_size)), labels


def run_outputs(runner, batches: list) -> list[tuple]:
    with torch.no_grad():
        return [runner.predict_all(b) for b in progress(batches, f"evaluating ({runner.runtime})")]


def outputs_accuracy(outputs: list[tuple], labels: torch.Tensor) -> float | None:
    """Top-1 accuracy of the first output, or ``None`` when the samples carry no labels."""
    if labels.numel() == 0 or bool((labels == NO_LABEL).any()):
        return None
    predicted = torch.cat([o[0].argmax(-1).reshape(-1) for o in outputs])
    return float((predicted == labels).float().mean())


def run_accuracy(runner, dataset: Dataset, batch_size: int = 256) -> tuple[float | None, int]:
    batches, labels = eval_batches(dataset, batch_size)
    return outputs_accuracy(run_outputs(runner, batches), labels), len(labels)


def describe(artifact: nn.Module | str | os.PathLike, runner, test: Dataset, *, label: str | None = None,
             reference_outputs: list[tuple] | None = None, fidelity_kind: str | None = None, metric=None) -> dict:
    """Everything but latency: accuracy (with labels) and fidelity to ``reference_outputs`` (the fp32
    model's, on the same batches) in the runner's runtime, counts, and on-disk sizes."""
    from deepshrink.evaluation.fidelity import fidelity

    batches, labels = eval_batches(test)
    outputs = run_outputs(runner, batches)
    accuracy, n = outputs_accuracy(outputs, labels), len(labels)
    x1 = S.take(batches[0], 0, 1)
    info: dict = {
        "artifact": label or (str(artifact) if not isinstance(artifact, nn.Module) else type(artifact).__name__),
        "runtime": runner.runtime, "accuracy": accuracy, "test_samples": n,
        "fidelity": fidelity(reference_outputs, outputs, kind=fidelity_kind, metric=metric) if reference_outputs else None,
        "params": None, "nonzero_params": None, "macs": None, "counts_source": "model",
        "file_bytes": None, "gzip_bytes": None, "zstd_bytes": None, "threads": runner.threads, "parity": None,
    }
    if isinstance(runner, EagerRunner):
        info["params"], info["nonzero_params"] = parameter_counts(runner.model)
        info["macs"] = count_macs(runner.model, x1)
    if not isinstance(artifact, nn.Module):
        path = Path(artifact)
        payload = path.read_bytes()
        info["file_bytes"] = len(payload)
        info.update(download_bytes(payload))
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
    reference: nn.Module | str | os.PathLike | None = None,
    fidelity: str | None = None,
    metric=None,
    code: str | None = None,
    isolate: bool = True,
) -> Metrics:
    """Accuracy on ``test`` (when it has labels), fidelity to ``reference`` (the original model,
    when given: ``evaluation.fidelity``, ``fidelity`` overrides the kind, ``metric`` adds a user
    figure), counts, on-disk size and batch-1 latency of ``artifact``.

    ``artifact`` is a module (measured in eager PyTorch) or a ``.pte`` / ``.onnx`` / checkpoint
    file (measured in ExecuTorch, ONNX Runtime, or eager PyTorch after a safe load). ``isolate``: a
    ``.pte`` / ``.onnx`` is first loaded and run once in a child process, so a corrupted file ends
    as an ``ArtifactError`` rather than a crash of this process (``evaluation.isolation``).
    """
    runner = open_runner(artifact, threads=threads, code=code, isolate=isolate)
    reference_outputs = None
    if reference is not None:
        reference_outputs = run_outputs(open_runner(reference, threads=threads, isolate=isolate, code=code), eval_batches(test)[0])
    info = describe(artifact, runner, test, label=label, reference_outputs=reference_outputs, fidelity_kind=fidelity, metric=metric)
    calls = [runner.call_for(S.stack([test[0][0]]))] if latency_runs else [None]
    with torch_threads(threads):
        latency, = interleaved_latency(calls, runs=latency_runs, warmup=warmup)
    return Metrics(**info, **latency)
