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
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.prelu.default:
            continue
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
