"""Graph rewrites that let ExecuTorch 1.5.1's XNNPACK lowering take graphs it rejects, each exact.

XNNPACK's ``ChannelsLastTaggedReshapePass`` files ``prelu`` among the ops that need an NHWC
input, so a PReLU applied to a ``[batch, features]`` tensor (after a Linear: MTCNN's RNet and
ONet) fails the whole lowering with "Attempting to convert non-NHWC compatible node to NHWC".
The rewrite views such an input as ``[batch, C, 1, 1]`` (or ``[batch, C, L, 1]``), applies the
same PReLU and views the result back. PReLU's slope is per channel on dim 1, which the view
keeps, so the values are unchanged.
"""
from __future__ import annotations

import torch

_aten = torch.ops.aten


def prelu_to_4d(program: torch.export.ExportedProgram) -> int:
    """Rewrite, in place, every PReLU whose input is 2-D or 3-D with static non-batch dims.
    Returns how many were rewritten."""
    graph = program.graph_module.graph
    rewritten = 0
    for node in _calls(graph, _aten.prelu.default):
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if val is None or val.dim() not in (2, 3) or not all(isinstance(d, int) for d in val.shape[1:]):
            continue
        inner = [int(d) for d in val.shape[1:]]
        to_4d, back = [-1, *inner] + [1] * (3 - len(inner)), [-1, *inner]
        with graph.inserting_before(node):
            x4 = graph.call_function(_aten.view.default, (x, to_4d))
        with graph.inserting_after(node):
            y = graph.call_function(_aten.view.default, (node, back))
        node.replace_all_uses_with(y, delete_user_cb=lambda user: user is not y)
        node.replace_input_with(x, x4)
        with val.fake_mode:
            x4.meta["val"] = _aten.view.default(val, to_4d)
            node.meta["val"] = _aten.prelu.default(x4.meta["val"], node.args[1].meta["val"])
            y.meta["val"] = _aten.view.default(node.meta["val"], back)
        for new in (x4, y):
            new.meta["stack_trace"] = node.meta.get("stack_trace")
            if "nn_module_stack" in node.meta:
                new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        rewritten += 1
    if rewritten:
        graph.lint()
        program.graph_module.recompile()
    return rewritten


def quantized_embeddings(program: torch.export.ExportedProgram) -> int:
    """Rewrite, in place, ``embedding(dequantize_per_channel(table_int8, scales, zeros, axis 0), ids)``
    into ExecuTorch's ``quantized_decomposed.embedding_byte(table_int8, scales, None, ids)``: the
    rows looked up are dequantized, not the whole table on every call (XNNPACK has no gather; this
    runs on ExecuTorch's quantized kernels). A table whose codes all fit in 4 bits (``[-8, 7]``:
    ``annotate_embeddings(bits=4)``) is packed two codes a byte (the even column in the high
    nibble, code + 8, the layout of ``embedding_4bit``) and looked up by ``embedding_4bit``.
    Symmetric tables only (zero points all 0, which the kernel then needs not). Returns how many
    were rewritten."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  defines embedding_byte/_4bit
    import executorch.kernels.quantized  # noqa: F401  registers its out variant for to_executorch

    graph = program.graph_module.graph
    rewritten = 0
    for node in _calls(graph, _aten.embedding.default):
        table = node.args[0]
        if not (isinstance(table, torch.fx.Node) and table.target is torch.ops.quantized_decomposed.dequantize_per_channel.default):
            continue
        weight, scales, zeros, axis, qmin, qmax, dtype = table.args[:7]
        if axis != 0 or dtype != torch.int8 or _constant(program, zeros).count_nonzero():
            continue
        op, args = torch.ops.quantized_decomposed.embedding_byte.default, (weight, scales, None, qmin, qmax, node.args[1])
        if qmin >= -8 and qmax <= 7 and _pack_nibbles(program, weight, table):
            op, args = torch.ops.quantized_decomposed.embedding_4bit.default, (weight, scales, None, -8, 7, node.args[1])
        with graph.inserting_before(node):
            fused = graph.call_function(op, args)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        if not table.users:
            graph.erase_node(table)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        _drop_unused_constants(program)   # the zero points the kernel does not read
        graph.lint()
        program.graph_module.recompile()
    return rewritten


def _pack_nibbles(program: torch.export.ExportedProgram, weight: torch.fx.Node, reader: torch.fx.Node) -> bool:
    """Replace the int8 ``[rows, cols]`` constant ``weight`` (codes in ``[-8, 7]``) by its uint8
    ``[rows, cols / 2]`` packing, if ``reader`` is its only reader and ``cols`` is even."""
    codes = _constant(program, weight)
    if codes.dim() != 2 or codes.shape[1] % 2 or set(weight.users) != {reader} or codes.min() < -8 or codes.max() > 7:
        return False
    biased = (codes.to(torch.int16) + 8).to(torch.uint8)
    packed = (biased[:, 0::2] << 4) | biased[:, 1::2]
    _set_constant(program, weight, packed.contiguous())
    return True


def _set_constant(program: torch.export.ExportedProgram, node: torch.fx.Node, value: torch.Tensor) -> None:
    sig = program.graph_signature
    name = (sig.inputs_to_parameters.get(node.name) or sig.inputs_to_buffers.get(node.name)
            or sig.inputs_to_lifted_tensor_constants.get(node.name))
    store = program.state_dict if name in program.state_dict else program.constants
    store[name] = torch.nn.Parameter(value, requires_grad=False) if isinstance(store[name], torch.nn.Parameter) else value
    node.meta["val"] = node.meta["val"].fake_mode.from_tensor(value, static_shapes=True)


def _drop_unused_constants(program: torch.export.ExportedProgram) -> None:
    """Remove lifted parameters, buffers and constants no node reads (they would be serialized)."""
    from torch.export.graph_signature import InputKind

    unused = {n.name for n in program.graph.nodes if n.op == "placeholder" and not n.users}
    kept = []
    for spec in program.graph_signature.input_specs:
        if spec.arg.name in unused and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            program.state_dict.pop(spec.target, None)
            program.constants.pop(spec.target, None)
            program.graph.erase_node(next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name))
        else:
            kept.append(spec)
    program.graph_signature.input_specs[:] = kept


def _calls(graph: torch.fx.Graph, target) -> list[torch.fx.Node]:
    """The nodes calling ``target``, listed first so the graph may change while they are visited."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is target]


def _constant(program: torch.export.ExportedProgram, node: torch.fx.Node) -> torch.Tensor:
    """The value of a lifted constant (parameter, buffer or tensor constant) placeholder."""
    sig = program.graph_signature
    name = (sig.inputs_to_parameters.get(node.name) or sig.inputs_to_buffers.get(node.name)
            or sig.inputs_to_lifted_tensor_constants.get(node.name))
    if name is None:
        raise KeyError(node.name)
    return program.state_dict[name] if name in program.state_dict else program.constants[name]
