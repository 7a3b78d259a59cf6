"""``metrics.json``: the machine-readable record of a run (schema ``deepshrink.metrics/1``).

Top-level keys: ``schema``, ``created``, ``recipe`` (the validated recipe), ``environment``
(CPU model, thread count, package versions), ``data`` (dataset name and split sizes),
``stages`` (per stage: recipe entry, seconds, summary), ``variants`` (per variant label: role
``fp32``/``compressed``, format ``eager``/``pte``/``onnx``, runtime, accuracy, test_samples, params,
nonzero_params, macs, counts_source, file_bytes, gzip_bytes and zstd_bytes (the download: after gzip -9 /
zstd -19), latency_ms_median, latency_ms_p90, latency_runs, threads, parity_max_abs_diff, parity (each check: runtime, figures, failures, passed),
parity_passed), ``shipped`` (the runtime file to ship: ``variant``, ``objective``, ``why``; null when
no runtime file passed parity), ``checks`` (derived comparisons) and ``notes`` (failed parity first, then
the int8 caveat derived from the CPU features found). ``environment`` has ``cpu``, ``cpu_arch``,
``cpu_features`` (read from the machine, ``core.cpu``).
"""
from __future__ import annotations

import datetime
import json
import math
import platform
from importlib import metadata
from pathlib import Path

from deepshrink.core.cpu import cpu_info
from deepshrink.core.io import atomic_write_text

SCHEMA = "deepshrink.metrics/1"


def cpu_model() -> str:
    return cpu_info().model


def parity_notes(variants: dict[str, dict]) -> list[str]:
    """One note per exported variant whose parity check failed (kept with ``parity: warn``)."""
    notes = []
    for label, v in variants.items():
        for check in v.get("parity") or []:
            if not check.get("passed", True):
                notes.append(f"PARITY FAILED: {label} in {check['runtime']}: {'; '.join(check['failures'])} — "
                             "this file does not compute what the model computes; do not ship it.")
    return notes


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
        "environment": {"cpu": cpu_model(), "cpu_arch": cpu_info().arch, "cpu_features": list(cpu_info().features),
                        "threads": evaluate_config.threads, "python": platform.python_version(), "packages": versions()},
        "data": {"name": ctx.data.name, "splits": ctx.data.sizes()},
        "stages": state.log,
        "variants": variants,
        "shipped": choose_shipped(variants, ctx.recipe.objective),
        "checks": derive_checks(variants),
        "notes": parity_notes(variants) + [cpu_info().int8_caveat()],
    }


def choose_shipped(variants: dict[str, dict], objective: str = "size") -> dict | None:
    """The one file a phone app would ship, among the compressed runtime files whose export parity
    passed, by the recipe's ``objective`` (``deploy.objective.pick``: ``size`` the smallest,
    ``latency`` the fastest median, ``balanced`` the smallest within 5 % of the fastest). ``None``
    when there is none."""
    from deepshrink.deploy.objective import TIE, pick

    candidates = {label: v for label, v in variants.items()
                  if v.get("role") == "compressed" and v.get("format") in ("pte", "onnx") and v.get("file_bytes")
                  and v.get("parity_passed") is not False}
    if not candidates:
        return None
    sizes = {label: v["file_bytes"] for label, v in candidates.items()}
    medians = {label: v.get("latency_ms_median") for label, v in candidates.items()}
    label = pick(objective, sizes, medians)
    timed = [m for m in medians.values() if m]
    if objective == "latency" and timed:
        why = f"the fastest runtime file ({1000 * medians[label]:.1f} µs median, batch 1)"
    elif objective == "balanced" and timed:
        why = (f"the smallest runtime file ({sizes[label]:,} B) within {TIE:.0%} of the fastest "
               f"({1000 * medians[label]:.1f} µs against {1000 * min(timed):.1f} µs)")
    else:
        why = f"the smallest runtime file ({sizes[label]:,} B)"
    others = len(candidates) - 1
    return {"variant": label, "objective": objective,
            "why": why + " whose export parity passed" + (f", of {others + 1} candidates" if others else "")}


def derive_checks(variants: dict[str, dict]) -> dict:
    """The comparisons a reader asks first, each computed from the measured variants."""
    def find(role: str, fmt: str):
        return next((v for v in variants.values() if v["role"] == role and v["format"] == fmt), None)

    checks: dict = {}
    simulated = find("compressed", "eager")
    for fmt in ("pte", "onnx"):
        runtime = find("compressed", fmt)
        if simulated and runtime and simulated["accuracy"] is not None and runtime["accuracy"] is not None:
            checks[f"compressed_{fmt}_minus_simulated_accuracy_pt"] = round(100 * (runtime["accuracy"] - simulated["accuracy"]), 3)
        elif simulated and runtime and simulated.get("fidelity") and runtime.get("fidelity"):
            name = simulated["fidelity"]["headline"]
            a, b = runtime["fidelity"]["value"], simulated["fidelity"]["value"]
            if a is not None and b is not None:
                checks[f"compressed_{fmt}_minus_simulated_{name}"] = round(a - b, 6)
        fp32, comp = find("fp32", fmt), runtime
        if fp32 and comp and comp["file_bytes"]:
            checks[f"{fmt}_size_ratio_fp32_over_compressed"] = round(fp32["file_bytes"] / comp["file_bytes"], 3)
            if fp32["latency_ms_median"] and comp["latency_ms_median"]:
                checks[f"{fmt}_speedup_fp32_over_compressed"] = round(fp32["latency_ms_median"] / comp["latency_ms_median"], 3)
    fp32_eager = find("fp32", "eager")
    if fp32_eager and simulated and fp32_eager["accuracy"] is not None and simulated["accuracy"] is not None:
        checks["simulated_minus_fp32_accuracy_pt"] = round(100 * (simulated["accuracy"] - fp32_eager["accuracy"]), 3)
    return checks


def finite(value):
    """``value`` with every NaN/infinity replaced by ``None``: metrics.json is strict JSON (no ``NaN``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_metrics(path: Path, document: dict) -> Path:
    return atomic_write_text(path, json.dumps(finite(document), indent=2, sort_keys=False, allow_nan=False))
