"""The export gate: does the written file compute what the module computes, in its own runtime?

Every export runs real samples through the file's runtime and through the module, and measures:

- ``max_abs_diff``, and for a graph whose output is quantized, the differences in units of the
  output's quantization step (``max_steps``, ``p99_steps``, ``mean_steps``): integer kernels
  round bias and requantization differently from PyTorch's float simulation, so one step apart
  is normal and a few steps after many layers is normal too; saturation is tens of steps;
- ``argmax_agreement`` over the last axis, for outputs with two or more classes (a tolerance
  only for a single-output model: of several outputs — boxes, landmarks — it is reported).

Tolerances (``TOLERANCES``), by kind of graph:

- ``float``: ``max_abs_diff <= 1e-3 * (1 + max |reference|)`` — fp32 kernels differ in summation
  order only;
- ``quantized`` (output quantized): ``p99_steps <= 3`` and ``mean_steps <= 1`` and
  ``argmax_agreement >= 0.97``;
- ``quantized-float-output`` (dynamic int8 — ``Int8Dynamic``'s graphs, ``Int8DynamicLowBit``'s
  modules — or a float last layer): ``p99 |Δ| <= 2 %`` of the reference's range and
  ``argmax_agreement >= 0.97``.

An int8 ONNX file whose layout can saturate on x86 without VNNI is also checked against an exact
emulation of those kernels (``quantization.saturation``), so a file that is right on this
machine but wrong on the CPUs it will meet is caught here, on any machine.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from deepshrink.core.cpu import cpu_info
from deepshrink.core.errors import ExportError
from deepshrink.core.outputs import output_kind

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


def output_steps(model) -> list[float | None]:
    """Per output of a PT2E graph: its quantization step when it comes from a dequantize node."""
    graph = getattr(model, "graph", None)
    output = next((n for n in graph.nodes if n.op == "output"), None) if graph is not None else None
    if output is None:
        return []

    def leaves(arg):
        if isinstance(arg, (tuple, list)):
            return [x for a in arg for x in leaves(a)]
        if isinstance(arg, dict):
            return [x for a in arg.values() for x in leaves(a)]
        return [arg]

    steps = []
    for node in leaves(output.args[0]):
        scale = None
        if getattr(node, "op", None) == "call_function" and "dequantize_per_tensor" in str(node.target):
            scale = node.args[1] if isinstance(node.args[1], (int, float)) else None
        steps.append(float(scale) if scale is not None else None)
    return steps


def is_quantized(model) -> bool:
    """A PT2E graph with quantize/dequantize nodes, or a module with ``Int8DynamicLowBit`` layers
    (int8 activations rounded at run time: the runtime's rounding may differ from PyTorch's by a step)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return bool(runtime_lowbit(model))
    return any(n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in graph.nodes)


def runtime_lowbit(model) -> dict[str, dict]:
    """``{layer: spec}`` of the ``Int8DynamicLowBit`` layers of an eager module (bits, group size, kernel)."""
    # a module whose class was never imported has none of its layers: a float export need not import torchao
    runtime = sys.modules.get("deepshrink.quantization.lowbit.runtime")
    return runtime.runtime_weights(model) if runtime is not None and isinstance(model, torch.nn.Module) else {}


def measure(reference, produced, *, runtime: str, step: float | None, quantized: bool, gate_argmax: bool = True) -> Parity:
    """Compare ``produced`` with ``reference`` and judge it against ``TOLERANCES``.

    Each side is a tensor, or a list of tensors (the same output over several batches, e.g. of
    different sequence lengths): differences are pooled over all of them.
    """
    refs = [reference] if isinstance(reference, torch.Tensor) else list(reference)
    prods = [produced] if isinstance(produced, torch.Tensor) else list(produced)
    samples = sum(int(r.shape[0]) if r.ndim else 1 for r in refs)
    diffs, agree, rows, ref_max, lo, hi = [], 0, 0, 0.0, float("inf"), float("-inf")
    failures: list[str] = []
    for r, p in zip(refs, prods, strict=True):
        r, p = r.detach().float(), p.detach().float()
        if r.shape != p.shape:
            return Parity(runtime, samples, "float", float("inf"), None,
                          failures=(f"output shape {tuple(p.shape)} != {tuple(r.shape)}",))
        if not torch.isfinite(p).all() and "non-finite outputs" not in failures:
            failures.append("non-finite outputs")
        diffs.append((r - p).abs().flatten())
        if r.ndim >= 2 and r.shape[-1] >= 2:
            agree += int((r.argmax(-1) == p.argmax(-1)).sum())
            rows += r.argmax(-1).numel()
        if r.numel():
            ref_max, lo, hi = max(ref_max, float(r.abs().max())), min(lo, float(r.min())), max(hi, float(r.max()))
    flat = torch.cat(diffs) if diffs else torch.zeros(0)
    agreement = agree / rows if rows else None
    max_abs = float(flat.max()) if flat.numel() else 0.0
    if not quantized:
        kind, tol = "float", TOLERANCES["float"]
        bound = tol["max_abs_rel"] * (1 + ref_max)
        if max_abs > bound:
            failures.append(f"max |Δ| {max_abs:.3g} > {bound:.3g}")
        return Parity(runtime, samples, kind, max_abs, agreement, failures=tuple(failures))
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
        span = (hi - lo) if hi > lo else 1.0
        parity = dict(p99_range_fraction=p99 / span)
        if parity["p99_range_fraction"] > tol["p99_range_fraction"]:
            failures.append(f"p99 |Δ| {parity['p99_range_fraction']:.1%} of the output range > {tol['p99_range_fraction']:.0%}")
    if gate_argmax and agreement is not None and agreement < tol["argmax_agreement"]:
        failures.append(f"argmax agreement {agreement:.1%} < {tol['argmax_agreement']:.0%}")
    return Parity(runtime, samples, kind, max_abs, agreement, failures=tuple(failures), **parity)


def measure_outputs(references: list[tuple], produced: list[tuple], *, runtime: str, steps: list[float | None],
                    quantized: bool) -> Parity:
    """One ``Parity`` over every output of every batch: the worst output's figures, every output's failures."""
    n_out = len(references[0])
    # top-1 agreement is a tolerance for a classifier's single output (rows of scores); of several
    # outputs (boxes, landmarks, scores), or of hidden states ([batch, seq, features]: the argmax of
    # a feature vector means nothing and flips on near-ties) it is reported, and each output is held
    # to its own quantization steps or range
    classifier = n_out == 1 and output_kind(references[0][0]) == "classification"
    per_output = [measure([r[i] for r in references], [p[i] for p in produced], runtime=runtime,
                          step=steps[i] if i < len(steps) else None, quantized=quantized, gate_argmax=classifier)
                  for i in range(n_out)]
    if len(per_output) == 1:
        return per_output[0]
    worst = max(per_output, key=lambda q: (not q.passed, q.p99_steps or 0.0, q.max_abs_diff))
    failures = tuple(f"output {i}: {f}" for i, q in enumerate(per_output) for f in q.failures)
    return dataclasses.replace(worst, failures=failures, extra={"outputs": len(per_output)})


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
