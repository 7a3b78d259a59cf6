"""Quantization-aware training through PT2E: ``prepare_qat_pt2e`` -> the training loop -> ``convert_pt2e``.

The graph is exported in training mode (batch norm live, so the quantizer's conv-bn patterns
fold it QAT-style); ``model.train()``/``model.eval()`` on the graph switch batch norm and
dropout (torchao's ``move_exported_model_to_train/eval``) and turn the observers on/off, so
validation inside the loop (``deepshrink.training.fit``'s, or yours) does not move the ranges.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.graph import capture, drop_unused_weights
from deepshrink.core.loops import Distillation, TrainFn, run_training
from deepshrink.core.targets import GUARDED_LAYOUTS, TargetProfile
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.configs import Int8QAT
from deepshrink.quantization.graph_passes import fold_padding_into_conv
from deepshrink.quantization.pt2e import activation_ranges_of, check_fp32_layers
from deepshrink.quantization.quantizer import build_quantizer, quantization_config


def train_qat(model: nn.Module, config: Int8QAT, data: DataSplits, target: TargetProfile, *,
              train_fn: TrainFn | None = None) -> torch.fx.GraphModule:
    """The fake-quantized graph after ``config.train`` through ``train_fn`` (``model`` is not modified).

    Its outputs are what the converted int8 model should reproduce; ``finalize_qat`` converts it.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    if train_fn is None:
        run_training(None, model, data, config.train, who="Int8QAT")   # raises before any export work
    fp32 = check_fp32_layers(model, config.fp32_layers)
    per_channel = target.quantizer.per_channel_weights if config.per_channel is None else config.per_channel
    graph = capture(copy.deepcopy(model), data.example_input(), max_batch=target.max_batch, dynamic=data.dynamic,
                    training=True).module()
    fold_padding_into_conv(graph)
    layout = config.int8_layout or target.quantizer.int8_layout
    if layout in GUARDED_LAYOUTS:
        # guarding narrows channels after the weights are final, which would move a trained
        # function; QAT trains the 7-bit weights in instead, everywhere (cannot saturate either)
        layout = layout.replace("-guarded", "-reduced")
    quantizer = build_quantizer(quantization_config(per_channel=per_channel, qat=True, int8_layout=layout), fp32_layers=fp32)
    with _conv_bn_rewrites_for_kinds_present(graph):
        prepared = prepare_qat_pt2e(graph, quantizer)
    allow_train_eval(prepared)
    train, teacher = config.train, None
    if not data.labelled:
        # raw inputs only: distil from the float model (its outputs are the targets), by the
        # user's Distillation where one is given (its loss: kl, mse, auto), else auto at temperature 1
        teacher = model
        train = dataclasses.replace(train, distill=train.distill or Distillation(temperature=1.0, alpha=1.0))
    history = run_training(train_fn, prepared, data, train, who="Int8QAT", teacher=teacher)
    prepared.eval()
    object.__setattr__(prepared, "_deepshrink_quant", {
        "per_channel": per_channel, "fp32_layers": list(fp32), "int8_layout": layout,
        "qat_val_accuracy": list(getattr(history, "val_accuracy", None) or []),
    })
    return prepared


def finalize_qat(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Convert a trained fake-quantized graph to the int8 (Q/DQ) graph the runtimes lower."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared.eval()
    details = dict(getattr(prepared, "_deepshrink_quant", {}))
    details["activation_ranges"] = activation_ranges_of(prepared)
    with _conv_bn_rewrites_for_kinds_present(prepared):
        converted = convert_pt2e(copy.deepcopy(prepared))
    _drop_batch_counts(converted)
    drop_unused_weights(converted)   # the float originals of the folded int8 weights
    object.__setattr__(converted, "_deepshrink_quant", details)
    return converted


@contextlib.contextmanager
def _conv_bn_rewrites_for_kinds_present(graph: torch.fx.GraphModule):
    """torchao's QAT conv-bn rewrites — the fuse of ``prepare_qat_pt2e``, the fold of
    ``convert_pt2e`` — tried only for the conv kinds ``graph`` holds.

    torchao 0.18 traces its patterns for each of 4 conv kinds (conv1d/2d, conv_transpose1d/2d)
    whatever the graph holds: the fold a match and a replacement for each of 12 variants a kind (96
    small exports), the fuse 3 a kind: bench/results/qat_passes.md times both ways. A kind
    absent from the graph cannot match, so its patterns are skipped here and nothing else changes
    (torchao's own passes, in their own order).
    """
    try:
        from torchao.quantization.pt2e import qat_utils
    except ImportError:
        qat_utils = None
    present = {getattr(F, op) for op in _aten_ops(graph) & set(_CONV_KINDS)}
    with _REWRITE_LOCK:   # module globals while it lasts: one preparation or conversion at a time sees them
        full = {name: getattr(qat_utils, name, None) for name in _CONV_BN_HELPERS}
        if None in full.values() or not present:   # another torchao, or no conv: its passes as they are
            yield
            return

        def only_present(helper):
            def call(m, conv_fn, example_inputs, is_cuda):
                return helper(m, conv_fn, example_inputs, is_cuda) if conv_fn in present else m
            return call

        for name, helper in full.items():
            setattr(qat_utils, name, only_present(helper))
        try:
            yield
        finally:
            for name, helper in full.items():
                setattr(qat_utils, name, helper)


def _drop_batch_counts(graph: torch.fx.GraphModule) -> None:
    """Remove batch norm's ``num_batches_tracked += 1`` left in the converted graph: torchao 0.18's fold
    removes it for ``BatchNorm2d`` alone, and for a ``BatchNorm1d`` the ``.pte`` carried a buffer
    mutated at every call."""
    counts = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.add_.Tensor
              and not n.users and n.args[0].op == "get_attr" and str(n.args[0].target).endswith("num_batches_tracked")]
    for node in counts:
        graph.graph.erase_node(node)
    if counts:
        graph.graph.eliminate_dead_code()
        graph.recompile()


def _aten_ops(graph: torch.fx.GraphModule) -> set[str]:
    """The names of the aten ops ``graph`` calls, e.g. ``{"conv2d", "batch_norm", "relu"}``."""
    return {n.target.overloadpacket.__name__ for n in graph.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}


_REWRITE_LOCK = threading.Lock()
_CONV_BN_HELPERS = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")   # torchao's, per conv kind
_CONV_KINDS = ("conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")   # the kinds torchao's fold matches


def allow_train_eval(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e import (
        disable_observer, enable_observer, move_exported_model_to_eval, move_exported_model_to_train,
    )

    def train(self, mode: bool = True):
        if not _switch_mode(self, mode):
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        self.apply(enable_observer if mode else disable_observer)
        return self

    prepared.train = types.MethodType(train, prepared)
    prepared.eval = types.MethodType(lambda self: self.train(False), prepared)
    return prepared


def _switch_mode(graph: torch.fx.GraphModule, train: bool) -> bool:
    """torchao's ``move_exported_model_to_train/eval`` with each rewrite skipped where the graph has
    nothing it could match; False when this torchao lacks the parts (then call it as it is).

    Each switch traces its dropout and batch-norm patterns anew (six small exports; ``fit`` switches
    twice an epoch; bench/results/qat_passes.md times both ways); a graph without dropout (or
    without batch norm) cannot match those patterns. Dropout and batch norm stay nodes in both modes
    (only their ``training`` argument changes), so what the graph holds does not change with it."""
    try:
        from torchao.quantization.pt2e import export_utils
        attr = export_utils._EXPORTED_TRAINING_ATTR
        replace_dropout, replace_batchnorm = export_utils._replace_dropout, export_utils._replace_batchnorm
    except (ImportError, AttributeError):
        return False
    if getattr(graph, attr, not train) == train:
        return True
    setattr(graph, attr, train)
    ops = _aten_ops(graph)
    if any("dropout" in op for op in ops):
        replace_dropout(graph, train_to_eval=not train)
    if any("batch_norm" in op for op in ops):
        replace_batchnorm(graph, train_to_eval=not train)
    return True
