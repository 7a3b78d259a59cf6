"""Int8 where it is faster: the target runtime's measured times decide which layers stay fp32.

Int8 is not always faster than fp32. At batch 1 a small layer's quantize and dequantize steps and
its kernel's fixed cost can outweigh the arithmetic it saves, and fp32 kernels with AVX-512 or
NEON are strong; users see "int8 is slower than fp32 on the device". So the choice is measured,
in the runtime the file will run in (the target's format: ``.pte`` for XNNPACK, ``.onnx`` for
ONNX Runtime), on this CPU, at batch 1:

1. the all-int8 file and the fp32 file;
2. for every quantized layer (Conv/Linear and their subclasses), the int8 file with that layer
   alone left in fp32 — a layer whose fp32 copy makes the file faster by more than ``MARGIN`` is
   slower in int8 here, transitions included;
3. the int8 file with all the layers of step 2 left in fp32.

All files are timed interleaved in one run, in ten rounds of a block of calls of each (each
file's steady state: ``core.timing.steady_block``). The objective then picks:

- ``latency``: the fastest file — the fp32 model itself when no int8 file beats it, so the
  result is never slower than fp32 in that runtime;
- ``balanced``: the smallest file whose median is within ``TIE`` of the fastest;
- ``size``: the all-int8 model, nothing measured (the default everywhere).

The returned record lists every file measured and, per layer, the int8 file's time with that
layer in fp32 against the all-int8 time: the per-layer decision and why.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Literal

from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import ConfigError
from deepshrink.core.selection import matches, weighted_layers
from deepshrink.core.targets import TargetProfile
from deepshrink.core.timing import steady_block, time_calls
from deepshrink.deploy.api import export
from deepshrink.evaluation.runners import open_runner
from deepshrink.quantization import Int8Dynamic, Int8Static

Objective = Literal["size", "latency", "balanced"]
OBJECTIVES: tuple[str, ...] = ("size", "latency", "balanced")
MARGIN = 0.02   # a layer goes back to fp32 when that makes the file at least 2 % faster
TIE = 0.05      # balanced: within 5 % of the fastest counts as as fast


def quantizable_layers(model: nn.Module, fp32_layers: tuple[str, ...] = ()) -> list[str]:
    """Names of the Conv/Linear layers (subclasses included) int8 quantization would touch: those
    no ``fp32_layers`` name or ``re:`` pattern already keeps in float."""
    return [name for name in weighted_layers(model) if not any(matches(p, name) for p in fp32_layers)]


def choose_by_latency(
    model: nn.Module, config, quantize_fn: Callable[[nn.Module, object], nn.Module], *, example_input,
    target: TargetProfile, objective: Objective, runs: int = 300, warmup: int = 30, log: Callable[[str], None] = lambda m: None,
) -> tuple[nn.Module, dict]:
    """(the model to ship under ``objective``, the record of what was measured and chosen).

    ``config``: ``Int8Static`` or ``Int8Dynamic`` (its ``fp32_layers`` stay fp32 in every file);
    ``quantize_fn(model, config)`` quantizes a copy of ``model``; ``example_input``: a real batch
    (traced with) whose first sample is timed.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not isinstance(config, (Int8Static, Int8Dynamic)):
        raise ConfigError(f"objective: {objective} re-quantizes once per layer, which is post-training int8 only, not "
                          f"{type(config).__name__}; use scheme int8-static or int8-dynamic, or objective: size")
    if objective == "size":
        return quantize_fn(model, config), {"objective": "size"}
    suffix = ".pte" if target.export_format == "pte" else ".onnx"
    layers = quantizable_layers(model, tuple(config.fp32_layers))
    x1 = S.take(example_input, 0, 1)
    with tempfile.TemporaryDirectory(prefix="deepshrink-objective-") as work:
        files: dict[str, Path] = {}

        def build(label: str, fp32: tuple[str, ...] | None) -> nn.Module:
            built = model if fp32 is None else quantize_fn(model, dataclasses.replace(config, fp32_layers=tuple(config.fp32_layers) + fp32))
            files[label] = Path(work) / f"{len(files)}{suffix}"
            export(built, files[label], example_input=example_input, target=target, parity="warn")
            return built

        log(f"      objective {objective}: timing int8 and fp32 {suffix} files, {len(layers)} layers one at a time")
        built = {"fp32": build("fp32", None), "int8": build("int8", ())}
        for name in layers:
            build(f"int8, {name} in fp32", (name,))
        medians = _medians(files, x1, runs, warmup)
        per_layer = [{"layer": name, "int8_ms": medians["int8"], "with_it_fp32_ms": medians[f"int8, {name} in fp32"],
                      "fp32": medians[f"int8, {name} in fp32"] < (1 - MARGIN) * medians["int8"]} for name in layers]
        slower = tuple(d["layer"] for d in per_layer if d["fp32"])
        for d in per_layer:
            log(f"      {d['layer']}: int8 file {1e3 * d['int8_ms']:.1f} µs, with it in fp32 {1e3 * d['with_it_fp32_ms']:.1f} µs"
                f" -> {'fp32' if d['fp32'] else 'int8'}")
        if slower and len(slower) < len(layers):
            built["mixed"] = build("mixed", slower)
            medians = _medians({k: files[k] for k in built}, x1, runs, warmup)   # the mix beside fp32 and int8, in one run
        sizes = {label: files[label].stat().st_size for label in built}
    chosen = pick(objective, sizes, {k: medians[k] for k in built})
    record = {
        "objective": objective, "runtime_format": suffix[1:], "chosen": chosen,
        "fp32_layers": list(slower) if chosen == "mixed" else [] if chosen == "int8" else layers,
        "files": {k: {"latency_ms_median": medians[k], "file_bytes": sizes[k]} for k in built},
        "per_layer": per_layer, "runs": runs,
    }
    log(f"      objective {objective}: chose the {chosen} model — " + ", ".join(
        f"{k} {1e3 * medians[k]:.1f} µs / {sizes[k]:,} B" for k in built))
    return built[chosen], record


def pick(objective: str, sizes: dict[str, int], medians: dict[str, float | None]) -> str:
    """The label ``objective`` ships among files measured by ``sizes`` (bytes) and ``medians``
    (seconds or ms; ``None`` for an untimed file): ``size`` the smallest (ties: the faster),
    ``latency`` the fastest (ties: the smaller), ``balanced`` the smallest within ``TIE`` of the
    fastest. Without timings every objective falls back to ``size``."""
    timed = {k: m for k, m in medians.items() if m}
    if objective == "latency" and timed:
        return min(timed, key=lambda k: (timed[k], sizes[k]))
    if objective == "balanced" and timed:
        fastest = min(timed.values())
        return min((k for k in timed if timed[k] <= (1 + TIE) * fastest), key=lambda k: (sizes[k], timed[k]))
    return min(sizes, key=lambda k: (sizes[k], timed.get(k, float("inf"))))


def _medians(files: dict[str, Path], x1, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per file, all timed interleaved in one run, in rounds (``steady_block``)."""
    times = time_calls([open_runner(path).call_for(x1) for path in files.values()], runs=runs, warmup=warmup,
                       block=steady_block(runs))
    return {label: statistics.median(t) for label, t in zip(files, times)}
