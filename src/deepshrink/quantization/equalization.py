"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1).

For two layers joined by a positively homogeneous activation, ``W2 relu(W1 x + b1)`` equals
``(W2 S) relu(S^-1 W1 x + S^-1 b1)`` for any positive diagonal ``S``. Choosing
``s_i = sqrt(r1_i / r2_i)`` — ``r1_i`` the range of output channel ``i`` of ``W1``, ``r2_i``
the range of input channel ``i`` of ``W2`` — makes both ranges ``sqrt(r1_i r2_i)``, so one
per-tensor (or per-channel) grid fits every channel. This matters for depthwise convs,
whose channels' ranges differ by orders of magnitude after batch-norm folding.

Pairs: conv/linear -> [ReLU | clamp(min=0) | nothing] -> [zero padding | max/avg pooling]* ->
conv/linear, every intermediate node used once (pooling and zero padding commute with a
positive per-channel scale).

A clip is not scale-equivariant: ``min(x / s, 6) != min(x, 6) / s``. The exact rewrite clips
channel ``i`` at ``6 / s_i``, but a per-channel bound does not fuse into a conv (XNNPACK's output
clamp is one min/max per kernel), so it would run as a separate op on a per-tensor int8 grid that
spans the largest bound, or in float; so ``equalize_graph`` skips such pairs (ReLU6, hardtanh,
clamp with an upper bound) and reports them, and the float function stays exactly what it was.
``relu6_as_relu`` (the ``cle_relu6_as_relu`` option) replaces ReLU6 (clip at 0 and above)
by ReLU first, as Nagel et al. do for MobileNetV2: this CHANGES THE FLOAT MODEL wherever an
activation exceeded its bound (on a trained MobileNet: top-1 agreement with the original fell
from 0.86 to 0.18); every such row says ``changes_float_model``, and ``quantize_static`` keeps it
only if int8 agreement with the original float model on the calibration samples does not drop.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from deepshrink.core import samples as S
from deepshrink.quantization.bias_correction import channel_means, describe_fidelity, no_worse, output_fidelity
from deepshrink.quantization.graph_passes import get_attr_tensor, set_attr_tensor
from deepshrink.quantization.quantizer import CLAMP_TARGETS, CONV_TARGETS, LINEAR_TARGETS, PAD_TARGETS, is_zero_pad, layer_name

log = logging.getLogger(__name__)

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
            if activation is None and (node.target in RELU_TARGETS or (node.target in CLAMP_TARGETS and clamp_bounds(node) == (0.0, None))):
                activation = node
            elif node.target in CLAMP_TARGETS and activation is None:
                low, high = clamp_bounds(node)
                if not relu6_as_relu or low != 0.0:
                    reason = (f"clip to [{low}, {high}] is not scale-equivariant: equalizing across it would change the float model "
                              "(cle_relu6_as_relu does that for clips at 0, under the int8 fidelity check)")
                    node = None
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


def clamp_bounds(node: Node) -> tuple[float | None, float | None]:
    """``(low, high)`` of a ``hardtanh``/``clamp`` node (``None``: unbounded on that side)."""
    if node.target == torch.ops.aten.clamp.default:
        args = list(node.args[1:]) + [None, None]
        low, high = node.kwargs.get("min", args[0]), node.kwargs.get("max", args[1])
    else:
        args = list(node.args[1:]) + [-1.0, 1.0][len(node.args) - 1:]
        low, high = node.kwargs.get("min_val", args[0]), node.kwargs.get("max_val", args[1])
    finite = lambda v: None if v is None or math.isinf(v) else float(v)  # noqa: E731
    return finite(low), finite(high)


def equalize_graph(gm: GraphModule, *, relu6_as_relu: bool = False, iterations: int = 20, tol: float = 1e-6) -> list[dict]:
    """Equalize every pair in place (iterating, since chains share layers); return per pair
    ``{first, second, activation, changes_float_model, ratio_before, ratio_after}`` where ratio
    is the mean over channels of ``max(r1_i, r2_i) / min(r1_i, r2_i)`` (1 = equalized), then per
    skipped pair ``{first, reason}`` with ``second`` ``None``."""
    pairs, skipped = find_pairs(gm, relu6_as_relu=relu6_as_relu)
    replaced = set()
    for _, _, activation in pairs:
        if activation is not None and activation.target in CLAMP_TARGETS and clamp_bounds(activation)[1] is not None:
            activation.target, activation.args, activation.kwargs = torch.ops.aten.relu.default, (activation.args[0],), {}
            replaced.add(activation)
    if replaced:
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
         "activation": "relu6 replaced by relu" if activation in replaced else ("relu" if activation is not None else "none"),
         "changes_float_model": activation in replaced, "ratio_before": b, "ratio_after": _imbalance(gm, first, second)}
        for (first, second, activation), b in zip(pairs, before)
    ]
    return report + [{**s, "second": None, "activation": None, "changes_float_model": False, "ratio_before": None, "ratio_after": None}
                     for s in skipped]


def guarded_equalization(reference: GraphModule, plain: tuple, ptq: Callable[[GraphModule], tuple], batches: list, expected: list,
                         *, relu6_as_relu: bool) -> tuple[tuple, GraphModule, dict]:
    """Equalize a copy of the float graph ``reference``, quantize it with ``ptq`` (float graph ->
    ``(quantized, samples seen, ranges)``) and keep it only if its outputs on ``batches`` are no
    further from ``expected`` (the original float outputs) than those of ``plain`` (``ptq`` of
    ``reference``). Returns the kept ``ptq`` result, the float graph it came from, and the record:
    ``{mode, applied, pairs, skipped, changes_float_model, fidelity_with, fidelity_without, seconds}``."""
    started = time.perf_counter()
    equalized = copy.deepcopy(reference)
    rows = equalize_graph(equalized, relu6_as_relu=relu6_as_relu)
    pairs = [r for r in rows if r["second"] is not None]
    record = {"mode": "cle_relu6_as_relu" if relu6_as_relu else "cle", "applied": False, "pairs": pairs,
              "skipped": [{"first": r["first"], "reason": r["reason"]} for r in rows if r["second"] is None],
              "changes_float_model": any(r["changes_float_model"] for r in pairs)}
    if not pairs:
        log.info("equalization: nothing to equalize (%d pairs skipped)", len(record["skipped"]))
        return plain, reference, {**record, "reason": "no pair to equalize", "seconds": round(time.perf_counter() - started, 3)}
    equalized_float = copy.deepcopy(equalized)   # ptq rewrites its argument; bias correction needs the float graph
    candidate = ptq(equalized)
    with_it = output_fidelity(expected, channel_means(candidate[0], batches, [], desc="equalization check: with")[1])
    without = output_fidelity(expected, channel_means(plain[0], batches, [], desc="equalization check: without")[1])
    kept = no_worse(with_it, without)
    log.info("equalization (%s, %d pairs%s) %s: int8 %s with it, %s without, on %d calibration samples", record["mode"], len(pairs),
             ", float model changed" if record["changes_float_model"] else "", "kept" if kept else "dropped (it lowered fidelity)",
             describe_fidelity(with_it), describe_fidelity(without), sum(S.batch_size(x) for x in batches))
    record.update(applied=kept, fidelity_with=with_it, fidelity_without=without, seconds=round(time.perf_counter() - started, 3))
    if not kept:
        record["reason"] = "int8 fidelity to the float model on the calibration samples was lower with it"
        return plain, reference, record
    return candidate, equalized_float, record


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
