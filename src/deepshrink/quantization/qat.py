"""Quantization-aware training through PT2E: ``prepare_qat_pt2e`` -> the training loop -> ``convert_pt2e``.

The graph is exported in training mode (batch norm live, so the quantizer's conv-bn patterns
fold it QAT-style); ``model.train()``/``model.eval()`` on the graph switch batch norm and
dropout (torchao's ``move_exported_model_to_train/eval``) and turn the observers on/off, so
validation inside the loop (``deepshrink.training.fit``'s, or yours) does not move the ranges.
"""
from __future__ import annotations

import copy
import dataclasses
import types

import torch
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
    prepared = prepare_qat_pt2e(graph, build_quantizer(quantization_config(per_channel=per_channel, qat=True, int8_layout=layout),
                                                       fp32_layers=fp32))
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
    converted = convert_pt2e(copy.deepcopy(prepared))
    drop_unused_weights(converted)   # the float originals of the folded int8 weights
    object.__setattr__(converted, "_deepshrink_quant", details)
    return converted


def allow_train_eval(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e import (
        disable_observer, enable_observer, move_exported_model_to_eval, move_exported_model_to_train,
    )

    def train(self, mode: bool = True):
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        self.apply(enable_observer if mode else disable_observer)
        return self

    prepared.train = types.MethodType(train, prepared)
    prepared.eval = types.MethodType(lambda self: self.train(False), prepared)
    return prepared
