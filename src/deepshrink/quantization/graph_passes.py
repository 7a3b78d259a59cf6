"""Float-preserving rewrites of a captured graph before quantization, and graph helpers.

``float_graph`` is the one place the float reference is built: quantization, bias
correction and the per-layer error report all start from it, so their node names agree.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from deepshrink.core import samples as S
from deepshrink.core.graph import capture
from deepshrink.quantization.quantizer import CONV_TARGETS, LINEAR_TARGETS, PAD_TARGETS, is_zero_pad


def float_graph(model: torch.nn.Module, example, *, max_batch: int, equalization: str = "none",
                dynamic=None) -> tuple[GraphModule, list[dict]]:
    """``torch.export`` graph with batch norm folded into convs, symmetric zero padding folded
    into the next conv, and (optionally) cross-layer equalization. Returns the graph and the
    equalization report (empty without equalization)."""
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    gm = capture(model, example, max_batch=max_batch, dynamic=dynamic).module()
    _fuse_conv_bn_(gm)   # the same fold prepare_pt2e does; doing it first lets CLE see folded weights
    fold_padding_into_conv(gm)
    report: list[dict] = []
    if equalization != "none":
        from deepshrink.quantization.equalization import equalize_graph

        report = equalize_graph(gm, relu6_as_relu=equalization == "cle_relu6_as_relu")
    return gm, report


def fold_padding_into_conv(gm: GraphModule) -> int:
    """``pad(x, [p, p, q, q]) -> conv(padding=(a, b))`` becomes ``conv(x, padding=(a + q, b + p))``.

    Only symmetric zero padding whose sole user is a conv folds (a conv pads symmetrically);
    any other padding stays and is quantized with its input's parameters. Returns the count.
    """
    folded = 0
    for pad in list(gm.graph.nodes):
        if pad.op != "call_function" or pad.target not in PAD_TARGETS or not is_zero_pad(pad):
            continue
        users = list(pad.users)
        if len(users) != 1 or users[0].target not in (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default):
            continue
        conv = users[0]
        amounts = list(pad.args[1])
        spatial = len(amounts) // 2
        pairs = [amounts[2 * i: 2 * i + 2] for i in range(spatial)][::-1]   # F.pad lists the last dim first
        x_rank = len(pad.args[0].meta["val"].shape) if "val" in pad.args[0].meta else None
        if any(a != b or a < 0 for a, b in pairs) or (x_rank is not None and spatial != x_rank - 2):
            continue
        args = list(conv.args) + [None] * (7 - len(conv.args))
        stride, padding = args[3] or [1] * spatial, args[4] if args[4] is not None else [0] * spatial
        if isinstance(padding, str):
            continue    # padding="same"/"valid": leave it
        padding = list(padding) * spatial if len(padding) == 1 else list(padding)
        args[3], args[4] = stride, [p + a for p, (a, _) in zip(padding, pairs)]
        args[5] = args[5] or [1] * spatial
        args[6] = 1 if args[6] is None else args[6]
        args[0] = pad.args[0]
        conv.args = tuple(args)
        gm.graph.erase_node(pad)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def weighted_nodes(gm: GraphModule) -> list[Node]:
    """Conv and linear call nodes in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_TARGETS + LINEAR_TARGETS]


def get_attr_tensor(gm: GraphModule, node: Node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr_tensor(gm: GraphModule, node: Node, value: torch.Tensor) -> None:
    """Replace the tensor behind a ``get_attr`` node, keeping it a Parameter if it was one."""
    *parents, leaf = node.target.split(".")
    owner = gm
    for part in parents:
        owner = getattr(owner, part)
    old = getattr(owner, leaf)
    new = torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else value.detach().clone()
    if leaf in getattr(owner, "_buffers", {}):
        owner._buffers[leaf] = new
    elif leaf in getattr(owner, "_parameters", {}):
        owner._parameters[leaf] = new
    else:
        setattr(owner, leaf, new)


def per_row_dequantized(gm: GraphModule, dq: Node) -> torch.Tensor:
    """The weight a per-channel ``dequantize`` of constant codes (``quantizer.is_int8_per_row``)
    computes, in float64: exact (an int8 code times a float32 scale), and ``.float()`` is the
    float32 the graph computes."""
    codes, scales, zero_points = (get_attr_tensor(gm, a) for a in dq.args[:3])
    return ((codes.double() - zero_points.double()[:, None]) * scales.double()[:, None]).detach()


def bias_node(gm: GraphModule, layer: Node, *, create: bool) -> Node | None:
    """The ``get_attr`` node feeding ``layer``'s bias; with ``create``, a zero bias is added if absent."""
    bias = layer.args[2] if len(layer.args) > 2 else None
    if isinstance(bias, Node) or not create:
        return bias if isinstance(bias, Node) else None
    weight = layer.args[1]
    out_channels = _weight_value(gm, weight).shape[0]
    name = f"_deepshrink_bias_{layer.name}"
    gm.register_buffer(name, torch.zeros(out_channels))
    with gm.graph.inserting_before(layer):
        bias = gm.graph.get_attr(name)
    args = list(layer.args)
    if layer.target in CONV_TARGETS and len(args) < 3:
        args += [None] * (3 - len(args))
    elif len(args) < 3:
        args.append(None)
    args[2] = bias
    layer.args = tuple(args)
    gm.recompile()
    return bias


def _weight_value(gm: GraphModule, weight: Node) -> torch.Tensor:
    """The float weight behind ``weight``, looking through a ``dequantize`` node."""
    if weight.op == "get_attr":
        return get_attr_tensor(gm, weight)
    if weight.op == "call_function" and "dequantize" in str(weight.target):
        return get_attr_tensor(gm, weight.args[0])
    raise ValueError(f"cannot read the weight of {weight.name}")


class _Stop(Exception):
    pass


@torch.no_grad()
def record_nodes(gm: GraphModule, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """Values of the named nodes for input ``x``; stops as soon as all are computed."""
    recorded: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in names:
                # a copy: a later in-place op (ReLU6(inplace=True) is hardtanh_) would rewrite it
                recorded[node.name] = value.detach().clone()
                if len(recorded) == len(names):
                    raise _Stop
            return value

    try:
        Recorder(gm).run(*S.flatten(x))
    except _Stop:
        pass
    return recorded
