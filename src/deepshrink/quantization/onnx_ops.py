"""ONNX translations for dynamically quantized graphs.

A PT2E dynamic graph computes each activation's qparams at run time with
``quantized_decomposed.choose_qparams.tensor`` and feeds them as *tensors* to
``quantize/dequantize_per_tensor.tensor``. The ONNX exporter (torch 2.13 + onnxscript 0.7)
has no translation for the first and, for the other two, only one that expects constant
scale and zero point. These translations produce plain ONNX ops (ReduceMin/ReduceMax,
QuantizeLinear/DequantizeLinear with computed inputs) with torch's arithmetic:
``scale = max((max(x, 0) - min(x, 0)) / (qmax - qmin), eps)``,
``zero_point = clamp(qmin - round(min(x, 0) / scale), qmin, qmax)``.

Pass them to ``torch.onnx.export(..., custom_translation_table=dynamic_quant_translations())``;
static graphs never use these overloads, so the table is safe to pass always.
"""
from __future__ import annotations

from typing import Callable


def dynamic_quant_translations() -> dict[Callable, Callable]:
    import torch
    import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed: a float export must not need an earlier quantize)
    from onnxscript import ir
    from onnxscript import opset18 as op

    def scalar(value, dtype):
        return op.Reshape(op.Cast(value, to=dtype), op.Constant(value=ir.tensor([], dtype=ir.DataType.INT64)))

    def choose_qparams_tensor(input, quant_min: int, quant_max: int, eps: float, dtype: int):
        zero = op.Constant(value_float=0.0)
        lo = op.Min(op.ReduceMin(input, keepdims=0), zero)
        hi = op.Max(op.ReduceMax(input, keepdims=0), zero)
        scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=float(quant_max - quant_min))), op.Constant(value_float=float(eps)))
        zero_point = op.Clip(op.Sub(op.Constant(value_float=float(quant_min)), op.Round(op.Div(lo, scale))),
                             op.Constant(value_float=float(quant_min)), op.Constant(value_float=float(quant_max)))
        one = op.Constant(value_ints=[1])
        return op.Reshape(scale, one), op.Reshape(op.Cast(zero_point, to=ir.DataType.INT64), one)

    def quantize_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype):
        return op.QuantizeLinear(input, scalar(scale, ir.DataType.FLOAT), scalar(zero_point, _onnx_int(dtype)))

    def dequantize_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype, out_dtype=-1):
        return op.DequantizeLinear(input, scalar(scale, ir.DataType.FLOAT), scalar(zero_point, _onnx_int(dtype)))

    qd = torch.ops.quantized_decomposed
    return {
        qd.choose_qparams.tensor: choose_qparams_tensor,
        qd.quantize_per_tensor.tensor: quantize_tensor,
        qd.dequantize_per_tensor.tensor: dequantize_tensor,
    }


def _onnx_int(dtype):
    import torch
    from onnxscript import ir

    table = {torch.int8: ir.DataType.INT8, torch.uint8: ir.DataType.UINT8, 3: ir.DataType.INT8, 2: ir.DataType.UINT8,
             ir.DataType.INT8: ir.DataType.INT8, ir.DataType.UINT8: ir.DataType.UINT8}
    if dtype in table:
        return table[dtype]
    raise ValueError(f"dynamic quantization to {dtype} has no ONNX QuantizeLinear type; use int8")
