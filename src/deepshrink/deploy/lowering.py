"""Format-specific lowering of a captured graph to bytes on disk."""
from __future__ import annotations

import itertools
import logging
import string
from pathlib import Path

import torch

from deepshrink.core.errors import ExportError
from deepshrink.core.extras import require
from deepshrink.core.io import atomic_path
from deepshrink.core.log import scoped_levels
from deepshrink.deploy.onnx_layout import unsigned_activations
from deepshrink.deploy.onnx_lowbit import matmul_nbits
from deepshrink.deploy.onnx_storage import compact_initializers
from deepshrink.deploy.recurrent import foldable_recurrent_weights
from deepshrink.deploy.scan_lowering import constants_into_bodies, drop_unused_constants, has_scan, program_constants, scan_partitioner
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
        # under no_grad: with grad on, the scan of a recurrent cell is traced again into a joint
        # forward/backward graph at every pass (torch's scan autograd), most of a recurrent export's time
        with torch.no_grad():
            manager = _lowered(program, XnnpackPartitioner, to_edge_transform_and_lower)
    except Exception as err:  # lowering raises many types; one line names the cause
        raise ExportError(f"ExecuTorch lowering failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    with atomic_path(path) as tmp:
        tmp.write_bytes(manager.buffer)
    return delegation(manager.exported_program().graph_module)


def _lowered(program, partitioner_type, to_edge_transform_and_lower):
    """The ExecuTorch program manager of ``program``, XNNPACK-delegated."""
    if has_scan(program):   # a recurrent cell's time loop (deploy.recurrent): its step lowered too
        constants = program_constants(program)
        edge = to_edge_transform_and_lower(program, transform_passes=[constants_into_bodies(constants)],
                                           partitioner=[scan_partitioner(partitioner_type, constants)])
        drop_unused_constants(edge.exported_program())
    else:
        edge = to_edge_transform_and_lower(program, partitioner=[partitioner_type()])
    return edge.to_executorch()


_BOOKKEEPING = {"getitem", "alloc", "view", "sym_size.int", "scan"}   # the runtime's own memory, shape and loop plumbing


def delegation(graph_module: torch.fx.GraphModule) -> dict:
    """How many XNNPACK delegates a lowered graph holds and which ops it runs outside them (on
    ExecuTorch's portable kernels: slower, and each one splits the delegate), scan bodies included:
    a delegate in a recurrent cell's step counts once, though it runs at every step."""
    calls, outside = 0, {}
    graphs = [m.graph for m in graph_module.modules() if isinstance(m, torch.fx.GraphModule)]   # scan bodies too
    for node in (n for graph in graphs for n in graph.nodes):
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


def to_onnx(program: torch.export.ExportedProgram, path: Path) -> list[dict]:
    """ONNX graph via the dynamo exporter; a PT2E-quantized program becomes a QDQ graph. Returns
    the weights stored as their codes (``deploy.onnx_storage``), one record each."""
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
        foldable_recurrent_weights(onnx_program.model)   # int8 LSTM/GRU weights ORT folds at load (deploy.recurrent)
        unsigned_activations(onnx_program.model)   # s8 activation Q/DQ as u8: exact, ORT's fast x86 kernels
        matmul_nbits(onnx_program.model, program)   # Int8DynamicLowBit layers: ORT's MatMulNBits
        stored = compact_initializers(onnx_program.model)   # grid/codebook/sparse weights as codes, decoded at load
        compact_names(onnx_program.model)
        onnx_program.save(str(tmp))
    return stored


def strip_debug_metadata(model) -> None:
    """Drop the exporter's debug records: per node (Python stack traces, module paths, FX names:
    half of a small model's bytes, and they carry the paths of the machine that exported it) and
    the graph's copy of the torch program's signature and shape constraints (``pkg.torch.export.*``:
    5,552 B of the tiny BERT example's file; nothing reads them back)."""
    for key in [k for k in model.graph.metadata_props if k.startswith("pkg.torch.")]:
        del model.graph.metadata_props[key]
    for graph in (model.graph, *model.graph.subgraphs()):
        for node in graph:
            node.metadata_props.clear()
            node.doc_string = None
            for value in node.outputs:
                value.metadata_props.clear()
                value.doc_string = None
    for value in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()):
        value.metadata_props.clear()


def compact_names(model) -> None:
    """Spend the file's bytes on weights, not on names. Every intermediate value (not the graph's
    inputs and outputs, which callers feed and read by name) and every node gets a short unique
    name (except ``MatMulNBits`` nodes, whose name ``onnx_kernels`` reads back). The exporter's names
    are FX paths, written once per producer and once per reader (the tiny BERT example's int8
    ``.onnx``: 193,883 B -> 180,737 B at the same SQNR, 35.12 dB; ``bench/results/examples.md``).
    What stays, because other tools need it: the ``value_info`` types and shapes (without them
    ONNX Runtime fuses less, no ``SkipLayerNormalization`` in that BERT, and its outputs differ);
    node names and the initializers' names (ONNX Runtime's ``quantize_static`` of our fp32 BERT
    wrote an invalid model from nameless nodes, and refused the file with short initializer names)."""
    from deepshrink.deploy.onnx_lowbit import NODE_SUFFIX

    public = [*model.graph.inputs, *model.graph.outputs]
    fixed = {id(v) for v in public}
    taken = {v.name for v in public} | {name for graph in (model.graph, *model.graph.subgraphs()) for name in graph.initializers}
    names = (name for name in map(_short_name, itertools.count()) if name not in taken)
    for graph in (model.graph, *model.graph.subgraphs()):
        inner = [out for node in graph for out in node.outputs if not out.is_initializer()]
        if graph is not model.graph:
            inner += list(graph.inputs)
        for value in inner:
            if id(value) not in fixed and value.name:
                value.name = next(names)
        for node in graph:
            if not (node.name or "").endswith(NODE_SUFFIX):
                node.name = next(names)   # unique: tools that edit the file (ONNX Runtime's quantize_static) key nodes by name


def _short_name(n: int) -> str:
    """The ``n``-th short identifier: a letter, then base 36 (``a``..``z``, ``a1``..``z1``, ``a2``...)."""
    name, n = string.ascii_lowercase[n % 26], n // 26
    digits = ""
    while n:
        n, r = divmod(n, 36)
        digits = (string.digits + string.ascii_lowercase)[r] + digits
    return name + digits
