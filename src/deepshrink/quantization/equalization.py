"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1).

For two layers joined by a positively homogeneous activation, ``W2 relu(W1 x + b1)`` equals
``(W2 S) relu(S^-1 W1 x + S^-1 b1)`` for any positive diagonal ``S``. Choosing
``s_i = sqrt(r1_i / r2_i)`` — ``r1_i`` the range of output channel ``i`` of ``W1``, ``r2_i``
the range of input channel ``i`` of ``W2`` — makes both ranges ``sqrt(r1_i r2_i)``, so one
per-tensor (or per-channel) grid fits every channel. This matters for depthwise convs,
whose channels' ranges differ by orders of magnitude after batch-norm folding.

Pairs: conv/linear -> [ReLU | nothing] -> [zero padding | max/avg pooling]* -> conv/linear, every
intermediate node used once (pooling and zero padding commute with a positive per-channel scale). ReLU6/hardtanh is not scale-equivariant (``min(x / s, 6) != min(x, 6) / s``):
such pairs are skipped, or with ``relu6_as_relu`` the clamp is replaced by ReLU first (what
the paper does for MobileNetV2; it changes the float model where activations exceeded 6).
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from deepshrink.quantization.graph_passes import get_attr_tensor, set_attr_tensor
from deepshrink.quantization.quantizer import CLAMP_TARGETS, CONV_TARGETS, LINEAR_TARGETS, PAD_TARGETS, is_zero_pad, layer_name

RELU_TARGETS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
# per-channel ops that commute with a positive per-channel scale
POOL_TARGETS = (torch.ops.aten.max_pool2d.default, torch.ops.aten.max_pool1d.default, torch.ops.aten.avg_pool2d.default)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s_i = sqrt(r1_i / r2_i)``, or 1 where either range is 0 (a dead channel stays as it is)."""
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))


def output_channel_ranges(w: torch.Tensor) -> torch.Tensor:
    """max |w| per output channel (dim 0)."""
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)


def input_channel_ranges(w: torch.Tensor, groups: int) -> torch.Tensor:
    """max |w| per *input* channel of a (grouped) conv or linear weight ``[out, in/groups, ...]``."""
    out, in_per_group = w.shape[0], w.shape[1]
    grouped = w.detach().abs().reshape(groups, out // groups, in_per_group, -1)
    return grouped.amax(dim=(1, 3)).reshape(groups * in_per_group)


def scale_input_channels(w: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    out, in_per_group = w.shape[0], w.shape[1]
    view = w.reshape(groups, out // groups, in_per_group, -1) * s.reshape(groups, 1, in_per_group, 1)
    return view.reshape(w.shape)


def find_pairs(gm: GraphModule, *, relu6_as_relu: bool) -> tuple[list[tuple[Node, Node, Node | None]], list[dict]]:
    """Equalizable ``(first, second, activation)`` triples, and the pairs skipped with the reason."""
    pairs, skipped = [], []
    for first in gm.graph.nodes:
        if first.op != "call_function" or first.target not in CONV_TARGETS + LINEAR_TARGETS or _is_transposed(first):
            continue
        node, activation, reason = first, None, None
        while True:
            if len(node.users) != 1:
                reason = "output used more than once" if len(node.users) > 1 else None
                node = None
                break
            node = next(iter(node.users))
            if node.target in RELU_TARGETS and activation is None:
                activation = node
            elif node.target in CLAMP_TARGETS and activation is None:
                if not relu6_as_relu:
                    reason, node = "ReLU6/hardtanh is not scale-equivariant (use equalization='cle_relu6_as_relu')", None
                    break
                activation = node
            elif (node.target in PAD_TARGETS and is_zero_pad(node)) or node.target in POOL_TARGETS:
                continue
            else:
                break
        if node is None or node.op != "call_function" or node.target not in CONV_TARGETS + LINEAR_TARGETS or _is_transposed(node):
            if reason:
                skipped.append({"first": layer_name(first), "reason": reason})
            continue
        second = node
        if (first.target in LINEAR_TARGETS) != (second.target in LINEAR_TARGETS):
            continue
        pairs.append((first, second, activation))
    return pairs, skipped


def equalize_graph(gm: GraphModule, *, relu6_as_relu: bool = False, iterations: int = 20, tol: float = 1e-6) -> list[dict]:
    """Equalize every pair in place (iterating, since chains share layers); return per-pair
    ``{first, second, activation, ratio_before, ratio_after}`` where ratio is the mean over
    channels of ``max(r1_i, r2_i) / min(r1_i, r2_i)`` (1 = equalized)."""
    pairs, skipped = find_pairs(gm, relu6_as_relu=relu6_as_relu)
    if relu6_as_relu:
        for _, _, activation in pairs:
            if activation is not None and activation.target in CLAMP_TARGETS:
                activation.target, activation.args, activation.kwargs = torch.ops.aten.relu.default, (activation.args[0],), {}
        gm.recompile()
    before = [_imbalance(gm, first, second) for first, second, _ in pairs]
    for _ in range(iterations):
        largest_change = 0.0
        for first, second, _ in pairs:
            largest_change = max(largest_change, _equalize_pair(gm, first, second))
        if largest_change < tol:
            break
    report = [
        {"first": layer_name(first), "second": layer_name(second),
         "activation": "relu" if activation is not None else "none", "ratio_before": b, "ratio_after": _imbalance(gm, first, second)}
        for (first, second, activation), b in zip(pairs, before)
    ]
    return report + [{**s, "second": None, "activation": None, "ratio_before": None, "ratio_after": None} for s in skipped]


def _equalize_pair(gm: GraphModule, first: Node, second: Node) -> float:
    w1, w2 = get_attr_tensor(gm, first.args[1]), get_attr_tensor(gm, second.args[1])
    groups = _groups(second)
    if w1.shape[0] != w2.shape[1] * groups:
        return 0.0
    s = equalization_scales(output_channel_ranges(w1), input_channel_ranges(w2, groups))
    with torch.no_grad():
        set_attr_tensor(gm, first.args[1], w1 / s.reshape(-1, *[1] * (w1.dim() - 1)))
        bias = first.args[2] if len(first.args) > 2 else None
        if isinstance(bias, Node):
            set_attr_tensor(gm, bias, get_attr_tensor(gm, bias) / s)
        set_attr_tensor(gm, second.args[1], scale_input_channels(w2, s, groups))
    return float((s.log().abs()).max())


def _imbalance(gm: GraphModule, first: Node, second: Node) -> float:
    r1 = output_channel_ranges(get_attr_tensor(gm, first.args[1]))
    r2 = input_channel_ranges(get_attr_tensor(gm, second.args[1]), _groups(second))
    ok = (r1 > 0) & (r2 > 0)
    if r1.shape != r2.shape or not ok.any():
        return math.nan
    return float((torch.maximum(r1, r2)[ok] / torch.minimum(r1, r2)[ok]).mean())


def _groups(node: Node) -> int:
    if node.target in LINEAR_TARGETS:
        return 1
    if node.target == torch.ops.aten.convolution.default:
        return int(node.args[8])
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


def _is_transposed(node: Node) -> bool:
    return node.target == torch.ops.aten.convolution.default and bool(node.args[6])
