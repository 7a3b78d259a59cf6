"""Dependency analysis: trace the model with ``torch.export`` and couple channels op by op.

Why ``torch.export`` and not ``torch.fx.symbolic_trace``: it traces with real shapes (every
tensor has a concrete size, so a flatten knows its H*W), it goes through Python control flow
instead of failing on it, and it lowers every spelling of an op (``F.relu``, ``nn.ReLU``,
``x.relu()``) to one ATen op, so one rule per op covers them all. It is also the capture every
exporter here starts from: a model it cannot trace could not be shipped anyway. Parameters come
back as graph inputs named by their module path, which is how an op is tied to its module.

Each tensor gets a ``Layout``: the dimension that carries prunable channels and the element of
every index along it (or no layout: nothing prunable there). Ops either pass the layout on,
couple layouts (``unite``), or are not understood: then every channel that reaches them is
fixed, the op is named in an ``UnprunableLayerWarning``, and its output has no layout.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
from torch import fx, nn

from deepshrink.core.errors import ExportError
from deepshrink.pruning.structured.channel_rules import (
    ELEMENTWISE, REDUCTIONS, SINGLE_INPUT, SPATIAL, ChannelRules, Layout, arg_of, shape_of, tensor_args,
)
from deepshrink.pruning.structured.graph import ChannelGraph, ParamSlice, Unsupported


_BASE_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


class UnprunableLayerWarning(UserWarning):
    """A layer or op was left unpruned (with every channel coupled to it); the message names it."""


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def trace(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    was_training = model.training
    model.eval()  # batch-norm as inference: one aten.batch_norm per layer, no running-stat updates
    try:
        return torch.export.export(model, (example_input,), strict=False)
    except Exception as err:  # torch.export raises many types; name the cause in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"structured pruning: torch.export could not trace {type(model).__name__}: {first}") from err
    finally:
        model.train(was_training)


def analyze_channels(model: nn.Module, example_input: torch.Tensor, *, warn: bool = True) -> ChannelGraph:
    """The channel graph of ``model`` on ``example_input`` (a batch of real inputs).

    Emits one ``UnprunableLayerWarning`` per layer or op it cannot prune through (``warn``).
    """
    program = trace(model, example_input)
    graph = _Walker(model, program).run()
    if warn:
        for message in describe_unsupported(graph):
            warnings.warn(message, UnprunableLayerWarning, stacklevel=2)
    return graph


def describe_unsupported(graph: ChannelGraph) -> list[str]:
    """One line per layer or op left unpruned: where, why, and which layers keep their width."""
    lines = []
    for item in graph.unsupported:
        coupled = graph.layers_touching(item.elements)
        keeps = f"; {', '.join(coupled)} keep{'s' if len(coupled) == 1 else ''} {'its' if len(coupled) == 1 else 'their'} width" if coupled else ""
        lines.append(f"structured pruning left {item.where} unpruned: {item.reason}{keeps}")
    return lines


class _Walker(ChannelRules):
    def __init__(self, model: nn.Module, program: torch.export.ExportedProgram) -> None:
        self.model, self.program = model, program
        signature = program.graph_signature
        self.tensor_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}  # placeholder -> "mod.param"
        self.modules = dict(model.named_modules())
        self.graph = ChannelGraph()
        self.layouts: dict[fx.Node, Layout | None] = {}
        self.uses: dict[str, int] = {}
        for node in program.graph.nodes:
            if node.op == "call_function":
                for arg in tensor_args(node):
                    owner = self._owner(arg)
                    if owner and owner[1] == "weight":
                        self.uses[owner[0]] = self.uses.get(owner[0], 0) + 1

    def run(self) -> ChannelGraph:
        for node in self.program.graph.nodes:
            if node.op == "call_function":
                self.layouts[node] = self._visit(node)
            elif node.op == "output":
                fx.node.map_arg(node.args, lambda n: self._fix(n))  # the model's outputs keep every channel
        return self.graph

    # -- helpers ----------------------------------------------------------------------------
    def _owner(self, node: Any) -> tuple[str, str] | None:
        if not isinstance(node, fx.Node) or node.op != "placeholder" or node.name not in self.tensor_of:
            return None
        module, _, param = self.tensor_of[node.name].rpartition(".")
        return module, param

    def _layout(self, node: Any) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, fx.Node) else None

    def _fix(self, node: Any) -> None:
        layout = self._layout(node)
        if layout is not None:
            self.graph.fix(layout.elements)

    def _where(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        op = str(getattr(node.target, "overloadpacket", node.target))
        if stack:
            path, klass = list(stack.values())[-1]
            klass = klass.rsplit(".", 1)[-1] if isinstance(klass, str) else getattr(klass, "__name__", str(klass))
            path = path.removeprefix("L['self'].").replace("L['self']", "") or "<model>"
            return f"{op} in '{path}' ({klass})"
        return op

    def _unsupported(self, node: fx.Node, reason: str, where: str | None = None) -> None:
        tracked = [self._layout(a) for a in tensor_args(node)]
        elements = tuple(e for layout in tracked if layout is not None for e in layout.elements)
        for layout in tracked:
            if layout is not None:
                self.graph.fix(layout.elements)
        if elements or where:
            self.graph.unsupported.append(Unsupported(where or self._where(node), reason, elements))

    # -- dispatch ---------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> Layout | None:
        if node.target is operator.getitem:
            return self.layouts.get(node.args[0]) if node.args[1] == 0 else None
        packet = getattr(node.target, "overloadpacket", None)
        op = packet.__name__ if packet is not None else str(node.target)
        op = op[:-1] if op.endswith("_") and not op.startswith("_") else op  # in-place variants act alike
        if op in ("conv1d", "conv2d", "conv3d", "convolution"):
            return self._conv(node, op)
        if op == "linear":
            return self._linear(node)
        if op in ("batch_norm", "_native_batch_norm_legit_no_training"):
            return self._batch_norm(node)
        tensors = tensor_args(node)
        if not any(self._layout(t) is not None for t in tensors):
            return None  # nothing prunable flows through here
        if op in ELEMENTWISE:
            return self._elementwise(node, tensors)
        if self._layout(node.args[0]) is None and op in SINGLE_INPUT:
            self._unsupported(node, f"channels reach {op} through an argument other than its input")
            return None
        if op in SPATIAL:
            return self._spatial(node, SPATIAL[op])
        if op in REDUCTIONS:
            return self._reduction(node)
        if op in ("softmax", "log_softmax", "_softmax", "_log_softmax"):
            return self._softmax(node)
        if op == "cat":
            return self._cat(node)
        if op == "flatten":
            return self._flatten(node)
        if op in ("view", "reshape", "_unsafe_view"):
            return self._view(node)
        if op in ("squeeze", "unsqueeze", "permute", "transpose", "t"):
            return self._move_dims(node, op)
        if op in ("pad", "constant_pad_nd"):
            return self._pad(node)
        self._unsupported(node, f"no channel rule for {op}")
        return None

    # -- layers -----------------------------------------------------------------------------
    def _module_for(self, node: fx.Node, kinds: tuple[type, ...], params: dict[int, tuple[str, str]]) -> tuple[str | None, str]:
        """(name of the module whose parameters this op reads, "") or (None, why it cannot be pruned)."""
        present = {i: arg_of(node, i, name) for i, (name, _) in params.items()}
        present = {i: a for i, a in present.items() if a is not None}
        if not present:
            return None, "it has neither weights nor running statistics"
        owner = self._owner(present[min(present)])
        if owner is None:
            return None, "its weight is computed in forward, not read from a module parameter"
        name = owner[0]
        module = self.modules.get(name)
        if not isinstance(module, kinds):
            return None, f"{type(module).__name__} is not one of {', '.join(k.__name__ for k in kinds)}"
        if type(module) not in kinds:
            # a subclass (TF-style "same" padding, a custom init) is its base when it holds no tensors
            # or layers of its own: what its forward computes is in the traced graph, which the
            # channel rules read, and the shrunk model is run before it is kept
            own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
            extra = sorted(own - _BASE_TENSORS) + sorted(n for n, _ in module.named_children())
            if extra:
                return None, (f"{type(module).__name__} subclasses {next(k for k in kinds if isinstance(module, k)).__name__} "
                              f"but holds {', '.join(extra)} of its own, which may depend on its width")
        for i, arg in present.items():
            if self._owner(arg) != (name, params[i][1]):
                return None, f"its {params[i][1]} is not {name}.{params[i][1]}"
        if self.uses.get(name, 0) > 1:
            return None, f"'{name}' is called {self.uses[name]} times (shared weights)"
        return name, ""

    def _reject(self, node: fx.Node, reason: str, label: str | None = None) -> None:
        self._unsupported(node, reason, where=label or self._where(node))

    def _misplaced(self, node: fx.Node, layout: Layout | None, expected: int, name: str) -> Layout | None:
        """The layout if its channels are on ``expected``; else they are fixed (and named) and None."""
        if layout is None or layout.dim == expected:
            return layout
        self.graph.fix(layout.elements)
        self.graph.unsupported.append(Unsupported(f"'{name}'", f"its input carries channels on dimension {layout.dim}, "
                                                               f"not {expected}", layout.elements))
        return None

    def _conv(self, node: fx.Node, op: str) -> Layout | None:
        name, reason = self._module_for(node, CONVS, {1: ("weight", "weight"), 2: ("bias", "bias")})
        if name is None:
            self._reject(node, reason)
            return None
        conv: nn.modules.conv._ConvNd = self.modules[name]
        label = f"'{name}' ({type(conv).__name__})"
        if op == "convolution" and arg_of(node, 6, "transposed", False):
            self._reject(node, "transposed convolutions are not pruned", label)
            return None
        layout = self._misplaced(node, self._layout(node.args[0]), len(shape_of(node.args[0])) - conv.weight.ndim + 1, name)
        c_in, c_out, groups = conv.in_channels, conv.out_channels, conv.groups
        if groups == 1:
            if layout is not None:
                self.graph.slices.append(ParamSlice(name, "weight", 1, layout.elements))
            return self._produce(name, conv, c_out, dim=len(shape_of(node)) - conv.weight.ndim + 1)
        if groups == c_in and c_out % c_in == 0:
            # depthwise (times a multiplier): output o reads input o // multiplier only, so the
            # two share one channel; the layer is no producer of its own
            if layout is None:
                return None
            multiplier = c_out // c_in
            out = tuple(layout.elements[o // multiplier] for o in range(c_out))
            self._slice_outputs(name, conv, out)
            return Layout(layout.dim, out)
        self._reject(node, f"grouped convolution (groups={groups}) is not pruned; its input and output channels keep their width", label)
        return None

    def _linear(self, node: fx.Node) -> Layout | None:
        name, reason = self._module_for(node, (nn.Linear,), {1: ("weight", "weight"), 2: ("bias", "bias")})
        if name is None:
            self._reject(node, reason)
            return None
        linear: nn.Linear = self.modules[name]
        layout = self._misplaced(node, self._layout(node.args[0]), len(shape_of(node.args[0])) - 1, name)
        if layout is not None:
            self.graph.slices.append(ParamSlice(name, "weight", 1, layout.elements))
        return self._produce(name, linear, linear.out_features, dim=len(shape_of(node)) - 1)

    def _produce(self, name: str, module: nn.Module, count: int, *, dim: int) -> Layout:
        elements = self.graph.new_elements(count, producer=name)
        self._slice_outputs(name, module, elements)
        return Layout(dim, elements)

    def _slice_outputs(self, name: str, module: nn.Module, elements: tuple[int, ...]) -> None:
        self.graph.slices.append(ParamSlice(name, "weight", 0, elements))
        if getattr(module, "bias", None) is not None:
            self.graph.slices.append(ParamSlice(name, "bias", 0, elements))

    def _batch_norm(self, node: fx.Node) -> Layout | None:
        params = {1: ("weight", "weight"), 2: ("bias", "bias"), 3: ("running_mean", "running_mean"), 4: ("running_var", "running_var")}
        name, reason = self._module_for(node, NORMS, params)
        if name is None:
            self._reject(node, reason)
            return None
        layout = self._misplaced(node, self._layout(node.args[0]), 1, name)
        if layout is None:
            return None
        for i, (arg_name, param) in params.items():
            if arg_of(node, i, arg_name) is not None:
                self.graph.slices.append(ParamSlice(name, param, 0, layout.elements))
        return layout
