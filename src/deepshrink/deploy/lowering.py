"""Format-specific lowering of a captured graph to bytes on disk."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from deepshrink.core.errors import ExportError
from deepshrink.core.extras import require
from deepshrink.core.io import atomic_path
from deepshrink.core.log import scoped_levels
from deepshrink.deploy.xnnpack_fixes import prelu_to_4d, quantized_embeddings


def to_pte(program: torch.export.ExportedProgram, path: Path) -> dict:
    """ExecuTorch program with every supported subgraph delegated to XNNPACK. Returns what ran
    outside the delegate: ``{"delegate_calls": n, "outside_delegate": {op: count}}``."""
    require("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    prelu_to_4d(program)   # XNNPACK 1.5.1 rejects PReLU on [batch, features]; exact rewrite
    quantized_embeddings(program)   # int8 tables looked up row by row
    try:
        manager = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as err:  # lowering raises many types; one line names the cause
        raise ExportError(f"ExecuTorch lowering failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    with atomic_path(path) as tmp:
        tmp.write_bytes(manager.buffer)
    return delegation(manager.exported_program().graph_module)


_BOOKKEEPING = {"getitem", "alloc", "view", "sym_size.int"}   # the runtime's own memory and shape plumbing


def delegation(graph_module: torch.fx.GraphModule) -> dict:
    """How many XNNPACK delegate calls a lowered graph makes and which ops it runs outside them
    (on ExecuTorch's portable kernels: slower, and each one splits the delegate)."""
    calls, outside = 0, {}
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            calls += 1
        elif name not in _BOOKKEEPING:
            op = str(node.target)
            if op.startswith("<EdgeOpOverload: "):
                op = op.removeprefix("<EdgeOpOverload: ").split(">")[0]
            op = op.removeprefix("aten.").removesuffix(".out").removesuffix("_out")
            outside[op] = outside.get(op, 0) + 1
    return {"delegate_calls": calls, "outside_delegate": outside}


def to_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    """ONNX graph via the dynamo exporter; a PT2E-quantized program becomes a QDQ graph."""
    import warnings

    require("onnx", "onnxscript")
    from deepshrink.quantization.onnx_ops import dynamic_quant_translations

    try:
        # the exporter's own log lines, quiet for this call only (a global setLevel would outlive it)
        with warnings.catch_warnings(), scoped_levels({"torch.onnx": logging.ERROR}):
            warnings.simplefilter("ignore")
            # dynamic int8 graphs use choose_qparams, which the exporter cannot translate by itself
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False,
                                             custom_translation_table=dynamic_quant_translations())
    except Exception as err:
        raise ExportError(f"ONNX export failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    with atomic_path(path) as tmp:
        strip_debug_metadata(onnx_program.model)
        onnx_program.save(str(tmp))


def strip_debug_metadata(model) -> None:
    """Drop the exporter's per-node debug records (Python stack traces, module paths, FX names):
    half of a small model's bytes, and they carry the paths of the machine that exported it."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            node.metadata_props.clear()
            node.doc_string = None
            for value in node.outputs:
                value.metadata_props.clear()
                value.doc_string = None
    for value in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()):
        value.metadata_props.clear()


