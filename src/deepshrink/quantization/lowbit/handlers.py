"""The low-bit configs plugged into the ``quantize`` verb. Each handler changes ``model`` in
place and returns it: weight-only schemes keep an eager module (float weights on the grid);
``Int8DynamicLowBit`` swaps Linear layers for ``DynamicQuantLinear`` (codes the runtime runs)."""
from __future__ import annotations

from torch import nn

from deepshrink.quantization.api import QUANTIZERS, QuantizeCall
from deepshrink.quantization.lowbit.codebook import codebook_quantize_
from deepshrink.quantization.lowbit.configs import Codebook, Int8DynamicLowBit, WeightOnly, WeightQAT
from deepshrink.quantization.lowbit.qat import train_qat_
from deepshrink.quantization.lowbit.runtime import runtime_weights, to_dynamic_lowbit_
from deepshrink.quantization.lowbit.uniform import quantize_weights_


@QUANTIZERS.register(WeightOnly, name="weight-only")
def _weight_only(model: nn.Module, config: WeightOnly, call: QuantizeCall) -> nn.Module:
    return quantize_weights_(model, config)


@QUANTIZERS.register(WeightQAT, name="weight-qat")
def _weight_qat(model: nn.Module, config: WeightQAT, call: QuantizeCall) -> nn.Module:
    return train_qat_(model, config, data=call.data, train_fn=call.train_fn)


@QUANTIZERS.register(Codebook, name="codebook")
def _codebook(model: nn.Module, config: Codebook, call: QuantizeCall) -> nn.Module:
    return codebook_quantize_(model, config, data=call.data, train_fn=call.train_fn)


@QUANTIZERS.register(Int8DynamicLowBit, name="int8-dynamic-lowbit")
def _int8_dynamic_lowbit(model: nn.Module, config: Int8DynamicLowBit, call: QuantizeCall) -> nn.Module:
    quantized = to_dynamic_lowbit_(model, config)
    # read back by quantize_report and copied by export into the sidecar: bits, group size, kernel per layer
    object.__setattr__(quantized, "_deepshrink_quant", {"runtime_weights": runtime_weights(quantized)})
    return quantized
