"""``metrics.json``: the machine-readable record of a run (schema ``deepshrink.metrics/1``).

Top-level keys: ``schema``, ``created``, ``recipe`` (the validated recipe), ``environment``
(CPU model, thread count, package versions), ``data`` (dataset name and split sizes),
``stages`` (per stage: recipe entry, seconds, summary), ``variants`` (per variant label: role
``fp32``/``compressed``, format ``eager``/``pte``/``onnx``, runtime, accuracy, test_samples, params,
nonzero_params, macs, counts_source, file_bytes, gzip_bytes, latency_ms_median, latency_ms_p90,
latency_runs, threads, parity_max_abs_diff), ``checks`` (derived comparisons) and ``notes``.
"""
from __future__ import annotations

import datetime
import json
import platform
from importlib import metadata
from pathlib import Path

from deepshrink.core.io import atomic_write_text

SCHEMA = "deepshrink.metrics/1"
LATENCY_NOTE = (
    "Latency was measured on this machine's x86 CPU, which has AVX-512 VNNI and AMX: int8 gains here "
    "overstate what ARM phones see. Ratios measured in one run (interleaved) are what transfer, not milliseconds."
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {}
    for package in ("deepshrink", "torch", "torchao", "executorch", "onnx", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def build_metrics(state, ctx, evaluate_config) -> dict:
    variants = state.variants
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": ctx.recipe.as_dict(),
        "environment": {"cpu": cpu_model(), "threads": evaluate_config.threads, "python": platform.python_version(), "packages": versions()},
        "data": {"name": ctx.data.name, "splits": ctx.data.sizes()},
        "stages": state.log,
        "variants": variants,
        "checks": derive_checks(variants),
        "notes": [LATENCY_NOTE],
    }


def derive_checks(variants: dict[str, dict]) -> dict:
    """The comparisons a reader asks first, each computed from the measured variants."""
    def find(role: str, fmt: str):
        return next((v for v in variants.values() if v["role"] == role and v["format"] == fmt), None)

    checks: dict = {}
    simulated = find("compressed", "eager")
    for fmt in ("pte", "onnx"):
        runtime = find("compressed", fmt)
        if simulated and runtime:
            checks[f"compressed_{fmt}_minus_simulated_accuracy_pt"] = round(100 * (runtime["accuracy"] - simulated["accuracy"]), 3)
        fp32, comp = find("fp32", fmt), runtime
        if fp32 and comp and comp["file_bytes"]:
            checks[f"{fmt}_size_ratio_fp32_over_compressed"] = round(fp32["file_bytes"] / comp["file_bytes"], 3)
            if fp32["latency_ms_median"] and comp["latency_ms_median"]:
                checks[f"{fmt}_speedup_fp32_over_compressed"] = round(fp32["latency_ms_median"] / comp["latency_ms_median"], 3)
    fp32_eager = find("fp32", "eager")
    if fp32_eager and simulated:
        checks["simulated_minus_fp32_accuracy_pt"] = round(100 * (simulated["accuracy"] - fp32_eager["accuracy"]), 3)
    return checks


def write_metrics(path: Path, document: dict) -> Path:
    return atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False))
