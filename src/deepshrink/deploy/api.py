"""The ``export`` verb: module -> ``.pte`` or ``.onnx``, checked in the runtime right away."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepshrink.core.errors import ExportError
from deepshrink.core.graph import capture
from deepshrink.core.targets import TargetProfile, get_target
from deepshrink.evaluation.counting import count_macs, parameter_counts
from deepshrink.evaluation.runners import open_runner
from deepshrink.deploy.lowering import to_onnx, to_pte
from deepshrink.formats.sidecar import write_sidecar

FORMATS = {".pte": to_pte, ".onnx": to_onnx, ".dsk": None}  # .dsk: deepshrink's compressed container


@dataclass(frozen=True)
class ExportResult:
    path: Path
    file_bytes: int
    parity_max_abs_diff: float   # runtime output vs the module's own, on the example batch
    parity_argmax_agreement: float


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_input: torch.Tensor,
    target: TargetProfile | str = "xnnpack",
    macs: int | None = None,
) -> ExportResult:
    """Write ``model`` as ``path`` (format from the suffix) and a ``<path>.json`` sidecar.

    ``example_input`` is a batch of real samples: the parity check runs it through the
    exported file and the module and records how far apart they are. ``macs``: the dense
    model's MACs, when the module is a quantized graph that cannot count its own.
    """
    path = Path(path)
    profile = get_target(target) if isinstance(target, str) else target
    if path.suffix not in FORMATS:
        raise ExportError(f"{path}: unknown export format {path.suffix!r}; use .pte (ExecuTorch/XNNPACK), .onnx or .dsk")
    if getattr(model, "_deepshrink_masks", None):
        raise ExportError("export: the model still carries pruning masks; call deepshrink.pruning.finalize(model) first")
    extra: dict = {}
    if path.suffix == ".dsk":
        extra["sparse_compute"] = _write_dsk(model, path, example_input)
    else:
        program = capture(model, example_input, max_batch=profile.max_batch)
        FORMATS[path.suffix](program, path)
    with torch.no_grad():
        reference = model(example_input)
        produced = open_runner(path).predict(example_input)
    diff = float((reference - produced).abs().max())
    agreement = float((reference.argmax(1) == produced.argmax(1)).float().mean())
    params, nonzero = parameter_counts(model)
    if macs is None:
        try:
            macs = count_macs(model, example_input)
        except Exception:
            macs = None
    write_sidecar(path, {
        "format": path.suffix[1:], "target": profile.name, "params": params, "nonzero_params": nonzero, "macs": macs,
        "parity_max_abs_diff": diff, "parity_argmax_agreement": agreement, "example_batch": int(example_input.shape[0]),
        "quantization": getattr(model, "_deepshrink_quant", None), **extra,
    })
    return ExportResult(path, path.stat().st_size, diff, agreement)


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

    try:
        # low-bit weights are stored as codes (+ scales or codebooks); anything else as dense/sparse floats
        save_compressed(model, path) if quantized_weights(model) else save_checkpoint(model, path)
    except Exception as err:
        raise ExportError(f"{path}: {err}") from None
    decisions = choose_sparse_compute(copy.deepcopy(model), example_input)
    return [d.as_dict() for d in decisions]
