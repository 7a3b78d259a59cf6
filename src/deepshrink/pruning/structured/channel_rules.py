"""Channel rules for ops that carry channels through without weights of their own.

Element-wise ops (activations, arithmetic with broadcasting), pooling, reductions over other
dimensions, concatenation, flatten/view and dimension moves. Each rule takes the op's node and
returns the output's ``Layout``, couples layouts in the channel graph, or reports the op as
unsupported (its channels fixed). The walker in ``dependency.py`` supplies ``graph``,
``_layout`` and ``_unsupported``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from deepshrink.pruning.structured.graph import ChannelGraph


@dataclass(frozen=True)
class Layout:
    dim: int                      # dimension of the tensor that carries the channels
    elements: tuple[int, ...]     # element of each index along ``dim``


# element-wise: every index of every dimension maps to the same index of the output
ELEMENTWISE = {
    "relu", "relu6", "hardtanh", "sigmoid", "tanh", "hardswish", "hardsigmoid", "silu", "gelu", "leaky_relu", "elu",
    "selu", "mish", "softplus", "clone", "contiguous", "dropout", "feature_dropout", "alpha_dropout", "detach", "alias",
    "abs", "neg", "exp", "sqrt", "rsqrt", "square", "clamp", "clamp_min", "clamp_max", "_to_copy", "to", "lift_fresh_copy",
    "add", "sub", "rsub", "mul", "div", "maximum", "minimum", "where", "pow", "gt", "ge", "lt", "le", "eq", "ne",
    "logical_and", "logical_or", "logical_not",
}
# pooling and resizing of the trailing ``n`` spatial dimensions; channels pass through
SPATIAL = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "max_pool2d_with_indices": 2, "avg_pool1d": 1, "avg_pool2d": 2,
    "avg_pool3d": 3, "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool2d": 2,
    "upsample_nearest2d": 2, "upsample_bilinear2d": 2,
}
REDUCTIONS = {"mean", "sum", "amax", "amin"}
# rules that read the channels of their first argument only
SINGLE_INPUT = {*SPATIAL, *REDUCTIONS, "softmax", "log_softmax", "_softmax", "_log_softmax", "flatten", "view", "reshape",
                "_unsafe_view", "squeeze", "unsqueeze", "permute", "transpose", "t", "pad", "constant_pad_nd"}


def shape_of(node: Any) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


def arg_of(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if shape_of(n) is not None else None)
    return found


class ChannelRules:
    graph: ChannelGraph

    def _layout(self, node: Any) -> Layout | None:  # pragma: no cover - provided by the walker
        raise NotImplementedError

    def _unsupported(self, node: fx.Node, reason: str, where: str | None = None) -> None:  # pragma: no cover
        raise NotImplementedError

    # -- channel-preserving ops ----------------------------------------------------------------
    def _elementwise(self, node: fx.Node, tensors: list[fx.Node]) -> Layout | None:
        out_shape = shape_of(node)
        if out_shape is None:
            self._unsupported(node, "its result is not one tensor")
            return None
        rank = len(out_shape)
        tracked = []
        for t in tensors:
            layout = self._layout(t)
            if layout is not None:
                tracked.append((rank - len(shape_of(t)) + layout.dim, layout))
        positions = {p for p, _ in tracked}
        if len(positions) != 1:
            self._unsupported(node, "its operands carry channels along different dimensions")
            return None
        position = positions.pop()
        width = out_shape[position]
        for t in tensors:
            if self._layout(t) is None:
                shape = shape_of(t)
                axis = position - (rank - len(shape))
                if axis >= 0 and shape[axis] > 1:
                    self._unsupported(node, f"an operand with {shape[axis]} per-channel values has channels that cannot be pruned "
                                              f"(a Parameter, the model input, or the output of an op left unpruned)")
                    return None
        full = [layout for _, layout in tracked if len(layout.elements) == width]
        for _, layout in tracked:
            if len(layout.elements) != width:  # broadcast from a single channel: that channel stays
                self.graph.fix(layout.elements)
        for other in full[1:]:
            self.graph.unite(full[0].elements, other.elements)
        return Layout(position, full[0].elements) if full else None

    def _spatial(self, node: fx.Node, spatial_dims: int) -> Layout | None:
        layout = self._layout(node.args[0])
        if layout.dim >= len(shape_of(node.args[0])) - spatial_dims:
            self._unsupported(node, "it pools over the channel dimension")
            return None
        return Layout(layout.dim, layout.elements)

    def _reduction(self, node: fx.Node) -> Layout | None:
        layout, rank = self._layout(node.args[0]), len(shape_of(node.args[0]))
        dims = arg_of(node, 1, "dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            self._unsupported(node, "it reduces over every dimension, channels included")
            return None
        dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
        if layout.dim in dims:
            self._unsupported(node, "it reduces over the channel dimension")
            return None
        keepdim = bool(arg_of(node, 2, "keepdim", False))
        return Layout(layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims), layout.elements)

    def _softmax(self, node: fx.Node) -> Layout | None:
        layout, rank = self._layout(node.args[0]), len(shape_of(node.args[0]))
        if arg_of(node, 1, "dim") % rank == layout.dim:
            self._unsupported(node, "it normalizes over the channel dimension")
            return None
        return layout

    def _cat(self, node: fx.Node) -> Layout | None:
        parts = list(node.args[0])
        rank = len(shape_of(node))
        dim = arg_of(node, 1, "dim", 0) % rank
        layouts = [self._layout(p) for p in parts]
        dims = {layout.dim for layout in layouts if layout is not None}
        if len(dims) != 1 or any(len(shape_of(p)) != rank for p in parts):
            self._unsupported(node, "its inputs carry channels along different dimensions")
            return None
        channel_dim = dims.pop()
        filled = [layout.elements if layout is not None else self.graph.new_elements(shape_of(p)[channel_dim], fixed=True)
                  for p, layout in zip(parts, layouts)]
        if dim == channel_dim:  # channel concat: offsets follow from the order of the parts
            return Layout(channel_dim, tuple(e for part in filled for e in part))
        for other in filled[1:]:  # concatenated along another dimension: index i is one channel in all parts
            self.graph.unite(filled[0], other)
        return Layout(channel_dim, filled[0])

    def _flatten(self, node: fx.Node) -> Layout | None:
        layout, shape = self._layout(node.args[0]), shape_of(node.args[0])
        rank = len(shape)
        start, end = arg_of(node, 1, "start_dim", 0) % rank, arg_of(node, 2, "end_dim", -1) % rank
        return self._merge_dims(node, layout, shape, start, end)

    def _merge_dims(self, node: fx.Node, layout: Layout, shape: tuple[int, ...], start: int, end: int) -> Layout | None:
        if layout.dim < start:
            return layout
        if layout.dim > end:
            return Layout(layout.dim - (end - start), layout.elements)
        if layout.dim != start:
            self._unsupported(node, "it flattens the channels into a dimension that already varies faster outside them")
            return None
        inner = math.prod(shape[layout.dim + 1 : end + 1])
        # channel c becomes features c*inner .. c*inner + inner - 1 (row-major): H*W inputs of the next Linear
        return Layout(start, tuple(e for e in layout.elements for _ in range(inner)))

    def _view(self, node: fx.Node) -> Layout | None:
        layout, before, after = self._layout(node.args[0]), shape_of(node.args[0]), shape_of(node)
        sizes = list(arg_of(node, 1, "size") or arg_of(node, 1, "shape"))
        d = layout.dim
        tail = before[d:]
        # the view must keep the dims before the channels, fold channels x the next k-1 dims into
        # dim d, and may reshape what follows freely
        k = next((k for k in range(1, len(tail) + 1) if math.prod(tail[:k]) == (after[d] if d < len(after) else -1)), None)
        if before[:d] != after[:d] or k is None or math.prod(tail[k:]) != math.prod(after[d + 1 :]):
            self._unsupported(node, f"it reshapes {list(before)} to {list(after)} across the channel dimension")
            return None
        if sizes[d] != -1:
            # export records sizes as numbers: a literal would no longer fit once channels go
            self._unsupported(node, f"its size {after[d]} along the channels is a number in the traced graph; write "
                                    f"x.flatten({d}) or x.view(..., -1, ...) with -1 there so it follows the width")
            return None
        return self._merge_dims(node, layout, before, d, d + k - 1)

    def _move_dims(self, node: fx.Node, op: str) -> Layout | None:
        layout, before, after = self._layout(node.args[0]), shape_of(node.args[0]), shape_of(node)
        rank = len(before)
        d = layout.dim
        if op == "squeeze":
            dims = arg_of(node, 1, "dim")
            dims = [i for i in range(rank) if before[i] == 1] if dims is None else ([dims] if isinstance(dims, int) else list(dims))
            dims = {x % rank for x in dims if before[x % rank] == 1}
            return Layout(d - sum(x < d for x in dims), layout.elements) if d not in dims else None
        if op == "unsqueeze":
            at = arg_of(node, 1, "dim") % (rank + 1)
            return Layout(d + 1 if at <= d else d, layout.elements)
        if op == "permute":
            order = [x % rank for x in arg_of(node, 1, "dims")]
            return Layout(order.index(d), layout.elements)
        a, b = ((0, 1) if op == "t" else (arg_of(node, 1, "dim0") % rank, arg_of(node, 2, "dim1") % rank))
        return Layout(b if d == a else a if d == b else d, layout.elements)

    def _pad(self, node: fx.Node) -> Layout | None:
        layout, rank = self._layout(node.args[0]), len(shape_of(node.args[0]))
        padded = len(arg_of(node, 1, "pad")) // 2  # pads the last ``padded`` dimensions
        if layout.dim >= rank - padded:
            self._unsupported(node, "it pads the channel dimension")
            return None
        return layout
