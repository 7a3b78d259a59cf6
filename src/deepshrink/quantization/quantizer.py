"""ExecuTorch's XNNPACK quantizer with what mobile nets need on top.

``XNNPACKQuantizer`` annotates conv/linear + ReLU as one pattern, but a clamp after a conv
(ReLU6 = ``hardtanh(0, 6)``) only *shares* the conv's observer: the conv output is then
quantized over its pre-activation range (say [-20, 15]) and the ReLU6 output [0, 6] gets a
fraction of the 256 codes — the classic MobileNet int8 collapse. Here a conv/linear followed
by ``hardtanh``/``clamp`` is annotated as one pattern: inputs at the conv, the output observer
after the clamp, nothing in between (XNNPACK fuses the clamp into the kernel's output bounds).

Zero padding (``ZeroPad2d``, ``F.pad``) takes its input's quantization parameters (0 is a
code of every affine int8 grid, so padding in int8 is exact) instead of being re-quantized
with a range of its own before the conv. ``fp32_layers`` leaves the matching modules
unannotated, so they stay in float.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch.fx import Node

from deepshrink.core.errors import ConfigError
from deepshrink.core.extras import require
from deepshrink.core.selection import matches

CONV_TARGETS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
LINEAR_TARGETS = (torch.ops.aten.linear.default,)
CLAMP_TARGETS = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default, torch.ops.aten.clamp.default)
RECURRENT_TARGETS = (torch.ops.aten.lstm.input, torch.ops.aten.gru.input)
PAD_TARGETS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)
BATCH_NORM_TARGETS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
                      torch.ops.aten._native_batch_norm_legit_no_training.default, torch.ops.aten.cudnn_batch_norm.default)
TRANSPOSED_TARGETS = (torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input,
                      torch.ops.aten.conv_transpose3d.input, torch.ops.aten.convolution.default)


def quantization_config(*, per_channel: bool, dynamic: bool = False, qat: bool = False,
                        calibration: str = "histogram", percentile: float = 99.99, int8_layout: str = "s8s8"):
    """XNNPACK's symmetric int8 config with our activation observer for static PTQ, laid out as
    ``int8_layout`` (``core.targets.INT8_LAYOUTS``: activation dtype and weight range)."""
    require("executorch")  # the XNNPACK quantizer ships with ExecuTorch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    from deepshrink.quantization.observers import CalibrationObserver, GridPreservingWeightObserver

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic, is_qat=qat)
    if per_channel and not qat:   # a weight already on a grid (weight QAT, weight-only) keeps it (observers module doc)
        config = dataclasses.replace(config, weight=dataclasses.replace(
            config.weight, observer_or_fake_quant_ctr=GridPreservingWeightObserver.with_args(eps=2**-12)))
    if dynamic:
        # activations are quantized at run time by the graph itself (int8); only the weight range applies
        return _with_layout(config, int8_layout, activations=False)
    if qat:
        return _with_layout(_unfused_qat(config, per_channel), int8_layout)
    observer = CalibrationObserver.with_args(method=calibration, percentile=percentile, eps=2**-12)
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer)
    # one spec object for inputs and outputs: PT2E then shares an observer along each edge
    return _with_layout(dataclasses.replace(config, input_activation=act, output_activation=act), int8_layout)


def _with_layout(config, layout: str, *, activations: bool = True):
    """``config`` with the activation dtype and weight range of ``layout``. PT2E builds each
    observer from its spec's dtype and range, so replacing the spec fields is enough."""
    from deepshrink.core.targets import layout_ranges

    ranges = layout_ranges(layout)
    weight = dataclasses.replace(config.weight, dtype=getattr(torch, ranges["weight_dtype"]),
                                 quant_min=ranges["weight_qmin"], quant_max=ranges["weight_qmax"])
    config = dataclasses.replace(config, weight=weight)
    if activations and ranges["activation_dtype"] == "uint8":
        act = dataclasses.replace(config.input_activation, dtype=torch.uint8, quant_min=0, quant_max=255)
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    return config


def _unfused_qat(config, per_channel: bool):
    """XNNPACK's QAT config with plain ``FakeQuantize`` instead of ``FusedMovingAvgObsFakeQuantize``.

    The fused kernel recomputes its scale on every forward with its own formula, which for
    symmetric per-channel weights differs from the observer's ``calculate_qparams`` (what
    ``convert_pt2e`` deploys) by ~0.5 %: the trained fake-quantized model then disagreed with
    the converted one by 2-3 output codes. ``FakeQuantize`` takes its scale from the observer,
    so the two agree; training is a little slower.
    """
    from torchao.quantization.pt2e import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, eps=2**-12))
    weight_observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
    weight = dataclasses.replace(config.weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(
        observer=weight_observer, eps=2**-12))
    return dataclasses.replace(config, input_activation=act, output_activation=act, weight=weight)


def module_paths(node: Node) -> list[str]:
    """Qualified names of the modules a graph node came from, outermost first."""
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def layer_name(node: Node) -> str:
    """The innermost module a node came from; the node's own name for ops called in the root's forward."""
    paths = [p for p in module_paths(node) if p]
    return paths[-1] if paths else node.name


def in_layers(node: Node, patterns: Iterable[str]) -> bool:
    return any(matches(p, path) for p in patterns for path in module_paths(node) if path)


@dataclasses.dataclass(frozen=True)
class Annotated:
    """Which graph nodes (by name) the quantizer gave int8 inputs, and which an int8 output."""

    inputs: frozenset[str]
    outputs: frozenset[str]


def build_quantizer(config, *, fp32_layers: tuple[str, ...] = (), embeddings: bool | int = False,
                    fp32_nodes: tuple[str, ...] = (), float_outputs: bool = False):
    """An ``XNNPACKQuantizer`` (subclass) with ``config`` global and ``fp32_layers`` left float;
    ``embeddings``: embedding tables quantized per row as well, ``True``/``8`` int8, ``4`` 4-bit
    (weight-only; see ``annotate_embeddings``). ``fp32_nodes``: graph nodes (by name) left
    unannotated as well — an op inside a layer, such as a residual add (``quantization.mixed_precision``).
    ``float_outputs`` (static configs): the conv/linear layers that compute the model's outputs
    (``output_layers``) get int8 weights and inputs quantized at run time instead, so their outputs
    stay float (XNNPACK's qd8-f32-qc8w kernels) rather than taking one of 256 static codes.
    After ``prepare_pt2e``, the quantizer's ``annotated`` (``Annotated``) names the nodes it annotated."""
    require("executorch")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class MobileXNNPACKQuantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return scalars_to_float_attrs(model)

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            # The conv-bn patterns are traced with torch.export on every call (about 0.3 s per
            # variant): keep only those that can match this graph. PTQ folds batch norm before
            # annotating, so there they never can.
            targets = {n.target for n in model.graph.nodes if n.op == "call_function"}
            has_bn = bool(targets & set(BATCH_NORM_TARGETS)) and self.global_config.is_qat
            has_transposed = bool(targets & set(TRANSPOSED_TARGETS))
            self.SUPPORTED_PATTERNS = [
                p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS
                if (has_bn or "_bn" not in p.name) and (has_transposed or "transpose" not in p.name)
            ]
            static = not (self.global_config.input_activation.is_dynamic or self.global_config.is_qat)
            outputs = output_layers(model) if float_outputs and static else frozenset()
            base_filter = self.filter_fn
            if outputs:   # the static patterns must not take them
                self.filter_fn = lambda n: n.name not in outputs and (base_filter is None or base_filter(n))
            if not self.global_config.input_activation.is_dynamic:
                annotate_clamped(model, self.global_config, self.filter_fn)
            super().annotate(model)
            self.filter_fn = base_filter
            if outputs:
                annotate_dynamic(model, self.global_config, lambda n: (n.op != "call_function" or n.name in outputs)
                                 and (base_filter is None or base_filter(n)))
            if embeddings:
                annotate_embeddings(model, self.filter_fn, bits=8 if embeddings is True else int(embeddings))
            annotate_recurrent(model, self.filter_fn, qat=self.global_config.is_qat)
            share_through_padding(model)
            drop_integer_annotations(model)
            from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

            marks = {n.name: n.meta[Q_ANNOTATION_KEY] for n in model.graph.nodes if Q_ANNOTATION_KEY in n.meta}
            self.annotated = Annotated(
                inputs=frozenset(name for name, a in marks.items() if a.input_qspec_map),
                outputs=frozenset(name for name, a in marks.items() if a.output_qspec is not None))
            return model

    quantizer = MobileXNNPACKQuantizer().set_global(config)
    quantizer.annotated = Annotated(frozenset(), frozenset())
    if fp32_layers or fp32_nodes:
        patterns, nodes = tuple(fp32_layers), frozenset(fp32_nodes)
        quantizer.set_filter_function(lambda node: node.name not in nodes and not in_layers(node, patterns))
    return quantizer


def output_layers(gm: torch.fx.GraphModule) -> frozenset[str]:
    """Names of the conv/linear nodes whose results reach a graph output through ops of one float
    tensor input each (activations, reshapes, a softmax): the layers that compute the model's outputs."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    stack = list(out.all_input_nodes)
    found, seen = set(), set()
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in CONV_TARGETS + LINEAR_TARGETS:
            found.add(node.name)
            continue
        tensors = [a for a in node.all_input_nodes if a.op != "get_attr" and _is_float(a)]
        if len(tensors) == 1:
            stack.append(tensors[0])
    return frozenset(found)


def annotate_dynamic(gm: torch.fx.GraphModule, static_config, filter_fn) -> None:
    """Annotate the conv/linear nodes ``filter_fn`` accepts as XNNPACK's dynamic patterns: the
    weights as in ``static_config`` (per-channel or not, its weight range), the input quantized per
    tensor at run time, no output spec (a float result)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import OP_TO_ANNOTATOR

    dynamic = get_dynamic_config(static_config)
    for pattern in ("linear", "conv"):
        OP_TO_ANNOTATOR[pattern](gm, dynamic, filter_fn)


def get_dynamic_config(static_config):
    """``static_config`` with XNNPACK's dynamic int8 activation spec in place of its static ones."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    act = get_symmetric_quantization_config(is_dynamic=True).input_activation
    return dataclasses.replace(static_config, input_activation=act, output_activation=None)


def annotate_embeddings(gm: torch.fx.GraphModule, filter_fn=None, *, bits: int = 8) -> int:
    """Mark every ``aten.embedding`` table for weight-only quantization, one symmetric scale per
    row (axis 0): ``bits=8`` range ±127, the lookup then reads int8 rows (ONNX: ``DequantizeLinear``
    → ``Gather``; ExecuTorch: ``embedding_byte``); ``bits=4`` range ±7, still held in an int8 tensor
    here and packed two codes a byte at export (ONNX: ``deploy.onnx_storage``'s uint8 codes unpacked
    by constant nodes; ExecuTorch: ``embedding_4bit``). The table is any constant, whatever indexes it: token ids from an input,
    or a buffer such as BERT's ``position_ids``. XNNPACK's quantizer leaves embeddings alone.
    Returns how many tables were marked."""
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    if bits not in (4, 8):
        raise ConfigError(f"embeddings: {bits!r} bits is not supported; use 8 (int8) or 4 (two codes a byte)")
    qmax = 2 ** (bits - 1) - 1
    spec = QuantizationSpec(dtype=torch.int8, quant_min=-qmax, quant_max=qmax, qscheme=torch.per_channel_symmetric,
                            ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2**-12))
    marked = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        if filter_fn is not None and not filter_fn(node):
            continue
        table = node.args[0]
        if not (isinstance(table, torch.fx.Node) and table.op == "get_attr"):   # a computed table stays float
            continue
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map={table: spec}, _annotated=True)
        marked += 1
    return marked


def annotate_recurrent(gm: torch.fx.GraphModule, filter_fn=None, *, qat: bool = False) -> int:
    """Mark the weight matrices (``w_ih``, ``w_hh`` of every layer and direction; the biases stay
    float) of every ``aten.lstm`` / ``aten.gru`` for weight-only int8, one symmetric scale per output
    row (axis 0), range ±127. XNNPACK's quantizer has no recurrent pattern, so without this an LSTM
    stays float through every int8 scheme. After ``convert_pt2e`` the cell reads int8 constants
    through ``dequantize_per_channel``: ONNX keeps its ``LSTM``/``GRU`` op on ``DequantizeLinear``'d
    weights; the ``.pte`` runs it as a scan over time of qd8-f32-qc8w linears (``deploy.recurrent``). ``qat``: the
    weights are fake-quantized while training, so training sees the rounding the file applies.
    A cell ``filter_fn`` rejects (``fp32_layers``) stays float. Returns how many matrices were marked."""
    from torchao.quantization.pt2e import FakeQuantize
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    observer = PerChannelMinMaxObserver.with_args(eps=2**-12)
    if qat:
        observer = FakeQuantize.with_args(observer=PerChannelMinMaxObserver, eps=2**-12)   # range, axis: from the spec
    spec = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                            ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=observer)
    marked = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in RECURRENT_TARGETS:
            continue
        if filter_fn is not None and not filter_fn(node):
            continue
        weights = recurrent_matrices(node)
        if not weights:   # an LSTM with proj_size: its parameter layout is not (w_ih, w_hh, biases); stays float
            continue
        if not all(isinstance(w, Node) and w.op == "get_attr" for w in weights):   # computed weights stay float
            continue
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map={w: spec for w in weights}, _annotated=True)
        marked += len(weights)
    return marked


def recurrent_matrices(cell: Node) -> list:
    """The weight matrices (``w_ih``, ``w_hh`` of every layer and direction; not the biases) among
    an ``aten.lstm`` / ``aten.gru`` node's parameters, in their order; none for an LSTM with a
    projection (``proj_size``: a ``w_hr`` per layer), which every int8 scheme leaves float."""
    params, has_biases, num_layers, bidirectional = cell.args[2], cell.args[3], cell.args[4], cell.args[7]
    per = 4 if has_biases else 2
    if len(params) != per * num_layers * (2 if bidirectional else 1):   # a projection (proj_size): not these
        return []
    return [p for i, p in enumerate(params) if i % per < 2]


def is_int8_per_row(node) -> bool:
    """Whether ``node`` dequantizes constant int8 codes with one scale per output row (axis 0):
    what ``annotate_recurrent`` leaves of a weight matrix after ``convert_pt2e``."""
    # by name: torch.ops.quantized_decomposed exists only once torchao is imported
    return (isinstance(node, Node) and node.op == "call_function"
            and str(node.target) == "quantized_decomposed.dequantize_per_channel.default"
            and node.args[3] == 0 and node.args[6] == torch.int8
            and all(isinstance(a, Node) and a.op == "get_attr" for a in node.args[:3]))   # constant codes


def int8_weights(cell: Node) -> bool:
    """Whether every weight matrix of an ``aten.lstm``/``aten.gru`` node is int8 per row
    (``is_int8_per_row``). A cell with any float weight matrix stays float."""
    weights = recurrent_matrices(cell)
    return bool(weights) and all(is_int8_per_row(w) for w in weights)


def scalars_to_float_attrs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """XNNPACK's scalar-to-tensor pass (so ``x + 1.5`` can carry a quantization spec), applied only
    to float adds and muls: XNNPACK's own makes every scalar a float tensor, which turns integer
    index arithmetic (``arange(seq) + offset`` in a transformer's attention mask) into floats."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor):
            continue
        if not _is_float(node) or "val" not in node.meta:
            continue
        args = []
        for arg in node.args:
            if isinstance(arg, Node) or not isinstance(arg, (int, float)):
                args.append(arg)
                continue
            name = f"_deepshrink_scalar_{len([n for n in gm.graph.nodes if n.op == 'get_attr'])}"
            value = torch.tensor(float(arg))
            gm.register_buffer(name, value)
            with gm.graph.inserting_before(node):
                attr = gm.graph.create_node("get_attr", name, (), {})
            attr.meta["val"] = node.meta["val"].fake_mode.from_tensor(value, static_shapes=True)
            args.append(attr)
        node.args = tuple(args)
    gm.recompile()
    return gm


def _is_float(node) -> bool:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value is None or not isinstance(value, torch.Tensor) or value.is_floating_point()


def drop_integer_annotations(gm: torch.fx.GraphModule) -> int:
    """Remove quantization specs from integer tensors (token ids, masks, indices): XNNPACK's shared
    annotations (e.g. of a view or a gather) can reach them, and a quantized index is no index.
    Returns how many specs were dropped."""
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    dropped = 0
    for node in gm.graph.nodes:
        annotation = node.meta.get(Q_ANNOTATION_KEY)
        if annotation is None:
            continue
        for arg in [a for a in annotation.input_qspec_map if not _is_float(a)]:
            del annotation.input_qspec_map[arg]
            dropped += 1
        if annotation.output_qspec is not None and not _is_float(node):
            annotation.output_qspec = None
            dropped += 1
    return dropped


def annotate_clamped(gm: torch.fx.GraphModule, config, filter_fn=None) -> list[list[Node]]:
    """Annotate ``conv|linear [-> batch_norm] -> hardtanh|clamp`` as one quantized pattern."""
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation, get_bias_qspec, get_input_act_qspec, get_output_act_qspec, get_weight_qspec,
    )
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    done = []
    for clamp in gm.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in CLAMP_TARGETS:
            continue
        producer = clamp.args[0]
        bn = None
        if isinstance(producer, Node) and producer.target in (torch.ops.aten.batch_norm.default,) and len(producer.users) == 1:
            bn, producer = producer, producer.args[0]   # QAT keeps batch norm until conversion
        if not isinstance(producer, Node) or producer.target not in CONV_TARGETS + LINEAR_TARGETS:
            continue
        if len(producer.users) != 1 or (producer.target == torch.ops.aten.convolution.default and producer.args[6]):
            continue  # the conv output is needed elsewhere, or it is a transposed conv
        weight = producer.args[1]
        bias = producer.args[2] if len(producer.args) > 2 else None
        partition = [clamp, producer, weight] + ([bias] if isinstance(bias, Node) else []) + ([bn] if bn else [])
        if any(Q_ANNOTATION_KEY in n.meta and n.meta[Q_ANNOTATION_KEY]._annotated for n in partition):
            continue
        if filter_fn is not None and not all(filter_fn(n) for n in partition):
            continue
        inputs = {producer.args[0]: get_input_act_qspec(config), weight: get_weight_qspec(config)}
        if isinstance(bias, Node):
            inputs[bias] = get_bias_qspec(config)
        producer.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config), _annotated=True)
        for n in partition:
            if Q_ANNOTATION_KEY not in n.meta:
                n.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation()
            n.meta[Q_ANNOTATION_KEY]._annotated = True
        done.append(partition)
    return done


def share_through_padding(gm: torch.fx.GraphModule) -> None:
    """Zero padding reuses its input's observer (like max-pool and reshape do in XNNPACK's quantizer)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in PAD_TARGETS or not is_zero_pad(node):
            continue
        prev = node.args[0]
        annotation = prev.meta.get(Q_ANNOTATION_KEY) if isinstance(prev, Node) else None
        if annotation is None or annotation.output_qspec is None:
            continue
        if Q_ANNOTATION_KEY in node.meta and node.meta[Q_ANNOTATION_KEY]._annotated:
            continue
        shared = SharedQuantizationSpec(prev)
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map={prev: shared}, output_qspec=shared, _annotated=True)


def is_zero_pad(node: Node) -> bool:
    if node.target == torch.ops.aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
        return value == 0
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    return mode == "constant" and (value is None or value == 0)
