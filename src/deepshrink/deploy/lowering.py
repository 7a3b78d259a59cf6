"""Format-specific lowering of a captured graph to bytes on disk."""
from __future__ import annotations

from pathlib import Path

import torch

from deepshrink.core.errors import ExportError
from deepshrink.core.io import atomic_path


def to_pte(program: torch.export.ExportedProgram, path: Path) -> None:
    """ExecuTorch program with every supported subgraph delegated to XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        manager = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as err:  # lowering raises many types; one line names the cause
        raise ExportError(f"ExecuTorch lowering failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    with atomic_path(path) as tmp:
        tmp.write_bytes(manager.buffer)


def to_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    """ONNX graph via the dynamo exporter; a PT2E-quantized program becomes a QDQ graph."""
    import logging
    import warnings

    from deepshrink.quantization.onnx_ops import dynamic_quant_translations

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # dynamic int8 graphs use choose_qparams, which the exporter cannot translate by itself
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False,
                                             custom_translation_table=dynamic_quant_translations())
    except Exception as err:
        raise ExportError(f"ONNX export failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    with atomic_path(path) as tmp:
        onnx_program.save(str(tmp))


