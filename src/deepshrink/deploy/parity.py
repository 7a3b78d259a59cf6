"""The export gate: does the written file compute what the module computes, in its own runtime?

Every export runs real samples through the file's runtime and through the module, and measures:

- ``max_abs_diff``, and for a graph whose output is quantized, the differences in units of the
  output's quantization step (``max_steps``, ``p99_steps``, ``mean_steps``): integer kernels
  round bias and requantization differently from PyTorch's float simulation, so one step apart
  is normal and a few steps after many layers is normal too; saturation is tens of steps;
- ``argmax_agreement`` over the last axis, for outputs with two or more classes.

Tolerances (``TOLERANCES``), by kind of graph:

- ``float``: ``max_abs_diff <= 1e-3 * (1 + max |reference|)`` — fp32 kernels differ in summation
  order only;
- ``quantized`` (output quantized): ``p99_steps <= 3`` and ``mean_steps <= 1`` and
  ``argmax_agreement >= 0.97``;
- ``quantized-float-output`` (dynamic int8, or a float last layer): ``p99 |Δ| <= 2 %`` of the
  reference's range and ``argmax_agreement >= 0.97``.

An int8 ONNX file whose layout can saturate on x86 without VNNI is also checked against an exact
emulation of those kernels (``quantization.saturation``), so a file that is right on this
machine but wrong on the CPUs it will meet is caught here, on any machine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from deepshrink.core.cpu import cpu_info
from deepshrink.core.errors import ExportError

TOLERANCES = {
    "float": {"max_abs_rel": 1e-3},
    "quantized": {"p99_steps": 3.0, "mean_steps": 1.0, "argmax_agreement": 0.97},
    "quantized-float-output": {"p99_range_fraction": 0.02, "argmax_agreement": 0.97},
}
EMULATED = "ONNX Runtime on x86 without VNNI (emulated)"


@dataclass(frozen=True)
class Parity:
    """How far a runtime's outputs are from the module's, and whether that is within tolerance."""

    runtime: str
    samples: int
    kind: str                          # a key of TOLERANCES
    max_abs_diff: float
    argmax_agreement: float | None
    output_step: float | None = None
    max_steps: float | None = None
    p99_steps: float | None = None
    mean_steps: float | None = None
    p99_range_fraction: float | None = None
    failures: tuple[str, ...] = ()     # "p99_steps 12.0 > 3.0", ...
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        parts = [f"max |Δ| {self.max_abs_diff:.3g}"]
        if self.p99_steps is not None:
            parts.append(f"p99 {self.p99_steps:.2f} / mean {self.mean_steps:.2f} output steps")
        if self.argmax_agreement is not None:
            parts.append(f"argmax agreement {self.argmax_agreement:.1%}")
        return ", ".join(parts) + f" on {self.samples} samples"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["failures"], d["passed"] = list(self.failures), self.passed
        return d


class ParityError(ExportError):
    """An exported file's outputs are beyond tolerance from the module's."""

    def __init__(self, message: str, parity: Parity) -> None:
        super().__init__(message)
        self.parity = parity


def output_step(model) -> float | None:
    """The quantization step of a PT2E graph's output, when its output is a dequantize node."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return None
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if output is None:
        return None
    first = output.args[0]
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    if getattr(first, "op", None) == "call_function" and "dequantize_per_tensor" in str(first.target):
        scale = first.args[1]
        return float(scale) if isinstance(scale, (int, float)) else None
    return None


def is_quantized(model) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any(
        n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in graph.nodes)


def measure(reference: torch.Tensor, produced: torch.Tensor, *, runtime: str, step: float | None,
            quantized: bool) -> Parity:
    """Compare ``produced`` with ``reference`` and judge it against ``TOLERANCES``."""
    reference, produced = reference.detach().float(), produced.detach().float()
    if reference.shape != produced.shape:
        return Parity(runtime, int(reference.shape[0]) if reference.ndim else 1, "float", float("inf"), None,
                      failures=(f"output shape {tuple(produced.shape)} != {tuple(reference.shape)}",))
    diff = (reference - produced).abs()
    samples = int(reference.shape[0]) if reference.ndim else 1
    agreement = None
    if reference.ndim >= 2 and reference.shape[-1] >= 2:
        agreement = float((reference.argmax(-1) == produced.argmax(-1)).float().mean())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    failures: list[str] = []
    if not torch.isfinite(produced).all():
        failures.append("non-finite outputs")
    if not quantized:
        kind, tol = "float", TOLERANCES["float"]
        bound = tol["max_abs_rel"] * (1 + float(reference.abs().max()))
        if max_abs > bound:
            failures.append(f"max |Δ| {max_abs:.3g} > {bound:.3g}")
        return Parity(runtime, samples, kind, max_abs, agreement, failures=tuple(failures))
    flat = diff.flatten()
    p99 = float(flat.quantile(0.99)) if flat.numel() > 1 else max_abs
    if step:
        kind, tol = "quantized", TOLERANCES["quantized"]
        steps = flat / step
        parity = dict(output_step=step, max_steps=float(steps.max()), p99_steps=p99 / step, mean_steps=float(steps.mean()))
        if parity["p99_steps"] > tol["p99_steps"]:
            failures.append(f"p99 |Δ| {parity['p99_steps']:.2f} output steps > {tol['p99_steps']}")
        if parity["mean_steps"] > tol["mean_steps"]:
            failures.append(f"mean |Δ| {parity['mean_steps']:.2f} output steps > {tol['mean_steps']}")
    else:
        kind, tol = "quantized-float-output", TOLERANCES["quantized-float-output"]
        span = float(reference.max() - reference.min()) or 1.0
        parity = dict(p99_range_fraction=p99 / span)
        if parity["p99_range_fraction"] > tol["p99_range_fraction"]:
            failures.append(f"p99 |Δ| {parity['p99_range_fraction']:.1%} of the output range > {tol['p99_range_fraction']:.0%}")
    if agreement is not None and agreement < tol["argmax_agreement"]:
        failures.append(f"argmax agreement {agreement:.1%} < {tol['argmax_agreement']:.0%}")
    return Parity(runtime, samples, kind, max_abs, agreement, failures=tuple(failures), **parity)


def likely_cause(parity: Parity, *, fmt: str, layout: str | None) -> str:
    """The cause and fix to name in a parity failure."""
    from deepshrink.core.targets import SATURATION_SAFE_LAYOUTS

    if fmt == "onnx" and layout is not None and layout not in SATURATION_SAFE_LAYOUTS and (
            parity.runtime == EMULATED or cpu_info().int8_pairs_saturate):
        return (f"likely cause: int8 layout {layout!r} uses full-range weights, and ONNX Runtime's u8 x s8 kernels on x86 "
                "without VNNI add product pairs in a saturating int16; fix: quantize with int8_layout 'u8s8-reduced' or "
                "'s8s8-reduced' (7-bit weights, cannot saturate) or 'u8u8' — the onnxruntime target's default does")
    if parity.kind == "float":
        return ("likely cause: the runtime lowers an op differently from PyTorch (or the module behaves differently when "
                "exported); fix: check the model under torch.export, or leave the layer out of the delegate")
    return ("likely cause: rounding or an op the runtime computes differently, compounded through the layers; fix: keep the "
            "worst layers in float (fp32_layers) or run int8-budget; export with parity: warn to keep and inspect the file")


def gate(path: Path, checks: list[Parity], *, fmt: str, layout: str | None, enforce: bool) -> None:
    """Raise ``ParityError`` for the first failed check when ``enforce``."""
    failed = next((p for p in checks if not p.passed), None)
    if failed is None or not enforce:
        return
    cpu = cpu_info()
    where = failed.runtime if failed.runtime == EMULATED else f"{failed.runtime} on this CPU ({cpu.describe()})"
    tol = TOLERANCES[failed.kind]
    raise ParityError(
        f"{path}: export parity check failed in {where}: {'; '.join(failed.failures)} ({failed.summary()}; "
        f"tolerance for a {failed.kind} graph: {', '.join(f'{k} {v}' for k, v in tol.items())}); "
        f"{likely_cause(failed, fmt=fmt, layout=layout)}; to keep the file anyway set export parity: warn "
        "(the report then shows it in red)",
        failed,
    )
