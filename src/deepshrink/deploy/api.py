"""The ``export`` verb: module -> ``.pte`` or ``.onnx``, checked in the runtime right away."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepshrink.core.masks import has_masks
from deepshrink.core import samples as S
from deepshrink.core.cpu import cpu_info
from deepshrink.core.graph import DynamicSpec
from deepshrink.core.outputs import output_tensors
from deepshrink.core.errors import ExportError
from deepshrink.core.graph import capture
from deepshrink.core.targets import SATURATION_SAFE_LAYOUTS, XNNPACK_LAYOUTS, TargetProfile, get_target
from deepshrink.deploy import parity as parity_check
from deepshrink.deploy.lowering import to_onnx, to_pte
from deepshrink.deploy.recurrent import scan_recurrent
from deepshrink.evaluation.counting import count_macs, parameter_counts
from deepshrink.evaluation.runners import open_runner
from deepshrink.formats.sidecar import write_sidecar

FORMATS = {".pte": to_pte, ".onnx": to_onnx, ".dsk": None}  # .dsk: deepshrink's compressed container


PARITY_MODES = ("fail", "warn")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    file_bytes: int
    parity_max_abs_diff: float   # runtime output vs the module's own, on the example batch
    parity_argmax_agreement: float | None
    parity: tuple[parity_check.Parity, ...] = ()   # the runtime on this CPU, then any emulated kernels

    @property
    def parity_passed(self) -> bool:
        return all(p.passed for p in self.parity)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_input: torch.Tensor,
    target: TargetProfile | str = "xnnpack",
    macs: int | None = None,
    parity: str = "fail",
    parity_samples: list | None = None,
    dynamic: "DynamicSpec | None" = None,
    static_batch: bool = False,
) -> ExportResult:
    """Write ``model`` as ``path`` (format from the suffix) and a ``<path>.json`` sidecar.

    ``example_input`` is a batch of real samples (a tensor, tuple or dict of tensors; the graph
    is traced with it) and the parity gate (``deploy.parity``) runs it — or ``parity_samples``, a
    list of unbatched samples that may differ in shape — through the exported file and the module; beyond tolerance, ``parity="fail"`` removes the file
    and raises ``ParityError`` naming the figure, the tolerance, the CPU and the likely fix, and
    ``parity="warn"`` keeps it and records the failure. ``dynamic``: the dimensions that vary besides
    the batch, per input name or position (``{"input_ids": {1: (2, 128)}}``, see ``core.graph``);
    ``static_batch``: batch fixed to 1 (the phone's case: one delegate call). ``macs``: recorded instead of the
    module's own count (``core.counting.count_macs``, which counts quantized graphs too).
    """
    path = Path(path)
    profile = get_target(target) if isinstance(target, str) else target
    if path.suffix not in FORMATS:
        raise ExportError(f"{path}: unknown export format {path.suffix!r}; use .pte (ExecuTorch/XNNPACK), .onnx or .dsk")
    if parity not in PARITY_MODES:
        raise ExportError(f"export: parity={parity!r} is not one of {', '.join(PARITY_MODES)}")
    if has_masks(model):
        raise ExportError("export: the model still carries pruning masks; call deepshrink.finalize(model) first")
    quant_info = getattr(model, "_deepshrink_quant", None) or {}
    if dynamic is None:
        dynamic = quant_info.get("dynamic")   # a graph quantized with dynamic dimensions exports with them
    layout = quant_info.get("int8_layout") if parity_check.is_quantized(model) else None
    if path.suffix == ".pte" and layout is not None and layout not in XNNPACK_LAYOUTS:
        raise ExportError(f"{path}: int8 layout {layout!r} has unsigned tensors, which XNNPACK does not run; quantize with "
                          f"int8_layout one of {', '.join(XNNPACK_LAYOUTS)} for a .pte, or export .onnx")
    extra: dict = {}
    if path.suffix == ".dsk":
        extra["sparse_compute"] = _write_dsk(model, path, example_input)
    else:
        traced = scan_recurrent(model) if path.suffix == ".pte" else model   # ONNX has an LSTM op; ExecuTorch has not
        program = capture(traced, example_input, max_batch=profile.max_batch, dynamic=dynamic, static_batch=static_batch)
        lowered = FORMATS[path.suffix](program, path)
        if lowered:   # .pte: what XNNPACK runs; .onnx: the weights stored as codes (deploy.onnx_storage)
            extra["delegation" if path.suffix == ".pte" else "stored_weights"] = lowered
    if static_batch:   # the file takes one sample per call
        batches = list(S.batches(parity_samples or S.unstack(example_input), 1))
    else:
        batches = list(S.batches(parity_samples, 64)) if parity_samples else [example_input]
    checks, saturation = _parity_checks(model, path, batches, layout)
    try:
        parity_check.gate(path, checks, fmt=path.suffix[1:], layout=layout, enforce=parity == "fail")
    except parity_check.ParityError:
        path.unlink(missing_ok=True)   # a file known to be wrong is not left where a deployment would find it
        raise
    diff, agreement = checks[0].max_abs_diff, checks[0].argmax_agreement
    params, nonzero = parameter_counts(model)
    if macs is None:
        try:
            macs = count_macs(model, example_input)
        except Exception:
            macs = None
    write_sidecar(path, {
        "format": path.suffix[1:], "target": profile.name, "params": params, "nonzero_params": nonzero, "macs": macs,
        "parity_max_abs_diff": diff, "parity_argmax_agreement": agreement, "example_batch": S.batch_size(example_input),
        "parity_batches": [list(S.shapes(b)) for b in batches], "dynamic": _plain(dynamic), "static_batch": static_batch,
        "parity": [p.as_dict() for p in checks], "parity_passed": all(p.passed for p in checks), "cpu": cpu_info().as_dict(),
        "int8_layout": layout, "x86_saturation": saturation,
        "quantization": getattr(model, "_deepshrink_quant", None), "runtime_weights": _runtime_weights(model, path),
        **extra,
    })
    return ExportResult(path, path.stat().st_size, diff, agreement, tuple(checks))


def _write_dsk(model: nn.Module, path: Path, example_input: torch.Tensor) -> list[dict]:
    """Write the container, then decide per Linear layer whether CSR compute beats dense.

    The decisions are measured here once and stored in the sidecar; the runner applies them
    when it loads the file, so evaluation measures exactly what was decided.
    """
    import copy

    from deepshrink.formats.sparse_compute import choose_sparse_compute
    from deepshrink.models.loading import save_checkpoint

    if isinstance(model, torch.fx.GraphModule):
        raise ExportError(f"{path}: a quantized graph cannot be stored as .dsk; store the float (pruned/codebook) model, or export .pte/.onnx")
    from deepshrink.quantization.lowbit import quantized_weights, save_compressed

    if parity_check.runtime_lowbit(model):
        raise ExportError(f"{path}: Int8DynamicLowBit layers are stored at low bits by the .pte itself; export .pte (or "
                          ".onnx), or quantize with WeightOnly(bits=4, granularity='per_group', group_size=32) for a .dsk")

    try:
        # low-bit weights are stored as codes (+ scales or codebooks); anything else as dense/sparse floats
        save_compressed(model, path) if quantized_weights(model) else save_checkpoint(model, path)
    except Exception as err:
        raise ExportError(f"{path}: {err}") from None
    decisions = choose_sparse_compute(copy.deepcopy(model), example_input)
    return [d.as_dict() for d in decisions]
def _parity_checks(model: nn.Module, path: Path, batches: list, layout: str | None):
    """The file's runtime on this CPU against the module, over every batch; for an int8 ONNX file
    whose layout can saturate, also the emulated x86-without-VNNI kernels. Returns the checks and
    the saturation counts."""
    runner = open_runner(path)
    with torch.no_grad():
        references = [output_tensors(S.call(model, b)) for b in batches]
        produced = [runner.predict_all(b) for b in batches]
    quantized = parity_check.is_quantized(model)
    steps = parity_check.output_steps(model) if quantized else []
    checks = [parity_check.measure_outputs(references, produced, runtime=runner.runtime, steps=steps, quantized=quantized)]
    saturation = None
    if path.suffix == ".onnx" and quantized and isinstance(model, torch.fx.GraphModule):   # int8 kernels: may saturate
        if layout in SATURATION_SAFE_LAYOUTS:
            saturation = {"layout": layout, "can_saturate": False}
        else:
            from deepshrink.quantization.saturation import SaturationReport, emulate_x86_without_vnni

            emulated, merged = [], SaturationReport()
            for b in batches:
                out, report = emulate_x86_without_vnni(model, b)
                emulated.append(output_tensors(out))
                for total, part in ((merged.pairs, report.pairs), (merged.saturated, report.saturated)):
                    for layer, n in part.items():
                        total[layer] = total.get(layer, 0) + n
            saturation = {"layout": layout, "can_saturate": True, **merged.as_dict()}   # which layers saturate: the fix
            checks.append(parity_check.measure_outputs(references, emulated, runtime=parity_check.EMULATED, steps=steps,
                                                       quantized=True))
    return checks, saturation


def _runtime_weights(model: nn.Module, path: Path) -> dict | None:
    """Per ``Int8DynamicLowBit`` layer, what the file stores and runs: bits, group size, kernel."""
    specs = parity_check.runtime_lowbit(model)
    if path.suffix == ".onnx" and specs:   # ORT's MatMulNBits where the layer fits (deploy.onnx_lowbit), else float ops
        from deepshrink.deploy.onnx_lowbit import onnx_kernels

        ran = onnx_kernels(path)
        specs = {name: {**spec, "kernel": ran.get(name, "onnx: int8 codes, dequantized in the graph")} for name, spec in specs.items()}
    return specs or None


def _plain(dynamic) -> dict | None:
    if not dynamic:
        return None
    return {str(k): {str(d): list(r) for d, r in dims.items()} for k, dims in dynamic.items()}
