"""Per-layer quantization error: which layer loses the signal.

For every quantized conv/linear, on ``samples`` calibration samples, SQNR in dB against the
float model (BN folded, same graph):

- ``layer_sqnr_db``: this layer alone — the float input, quantized with this layer's input
  quantizer, through the int8 weights, vs the float output. Errors of earlier layers are
  excluded, so this is the column that says which layer breaks (and what the fp32 fallback
  of ``Int8WithinBudget`` ranks by);
- ``weight_sqnr_db``: the int8 weight vs the float weight;
- ``input_sqnr_db`` / ``output_sqnr_db``: what the whole quantized model feeds this layer
  and what the layer produces (before its activation), errors of earlier layers included.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.data.splits import DataSplits
from deepshrink.ops.quant_math import sqnr_db


@dataclass(frozen=True)
class LayerError:
    layer: str             # module name (the fp32 fallback takes this)
    node: str              # graph node
    kind: str              # conv or linear
    layer_sqnr_db: float
    weight_sqnr_db: float
    input_sqnr_db: float
    output_sqnr_db: float

    def as_dict(self) -> dict:
        return asdict(self)


def layer_sqnr_report(float_model: nn.Module, quantized_model: nn.Module, data: DataSplits, *, samples: int = 256,
                      split: str = "calib") -> list[LayerError]:
    """One ``LayerError`` per quantized conv/linear of ``quantized_model`` (from ``quantize``), in graph order."""
    from deepshrink.core.targets import get_target
    from deepshrink.quantization.bias_correction import calibration_batches
    from deepshrink.quantization.graph_passes import float_graph, get_attr_tensor, record_nodes, weighted_nodes
    from deepshrink.quantization.quantizer import LINEAR_TARGETS, layer_name

    info = getattr(quantized_model, "_deepshrink_quant", None)
    if not info or not isinstance(quantized_model, torch.fx.GraphModule):
        raise ConfigError("layer_sqnr_report: quantized_model must be the graph returned by deepshrink.quantize")
    config = info.get("config", {})
    applied = info.get("equalization") or {}   # what quantize kept: the guard may have dropped the config's CLE
    equalization = config.get("equalization", "none") if isinstance(applied, dict) and applied.get("applied") else "none"
    reference, _ = float_graph(float_model, data.example_input(), max_batch=get_target("xnnpack").max_batch, dynamic=data.dynamic,
                               equalization=equalization)
    float_layers = {n.name: n for n in weighted_nodes(reference)}
    layers = [n for n in weighted_nodes(quantized_model) if n.name in float_layers and _dequantized_weight(n) is not None]
    if not layers:
        raise ConfigError("layer_sqnr_report: no quantized conv/linear layer matches the float model; pass the model it was quantized from")
    for n in layers:
        if layer_name(n) != layer_name(float_layers[n.name]):
            raise ConfigError(f"layer_sqnr_report: node {n.name} is {layer_name(n)} in the quantized model but "
                              f"{layer_name(float_layers[n.name])} in the float one; pass the model it was quantized from")
    batches = _batches(data, split, samples) if split != "calib" else calibration_batches(data, samples)
    q_names = {n.name for n in layers} | {n.args[0].name for n in layers}
    f_names = {n.name for n in layers} | {float_layers[n.name].args[0].name for n in layers}
    q_values = _concat([record_nodes(quantized_model, x, q_names) for x in batches])
    f_values = _concat([record_nodes(reference, x, f_names) for x in batches])
    rows = []
    for n in layers:
        f = float_layers[n.name]
        dq = _dequantized_weight(n)
        w_q = torch.ops.quantized_decomposed.dequantize_per_channel.default(*[_value(quantized_model, a) for a in dq.args]) \
            if dq.target == torch.ops.quantized_decomposed.dequantize_per_channel.default else \
            torch.ops.quantized_decomposed.dequantize_per_tensor.default(*[_value(quantized_model, a) for a in dq.args])
        x_float = f_values[f.args[0].name]
        bias = n.args[2] if len(n.args) > 2 else None
        alone = n.target(_as_quantized_input(n.args[0], x_float), w_q, _value(quantized_model, bias), *n.args[3:])
        rows.append(LayerError(
            layer=layer_name(n), node=n.name, kind="linear" if n.target in LINEAR_TARGETS else "conv",
            layer_sqnr_db=sqnr_db(f_values[n.name], alone),
            weight_sqnr_db=sqnr_db(get_attr_tensor(reference, f.args[1]), w_q),
            input_sqnr_db=sqnr_db(f_values[f.args[0].name], q_values[n.args[0].name]),
            output_sqnr_db=sqnr_db(f_values[n.name], q_values[n.name]),
        ))
    return rows


def format_report(rows: list[LayerError]) -> str:
    """A fixed-width table; the layer with the lowest SQNR on its own is marked."""
    worst = min(rows, key=lambda r: r.layer_sqnr_db) if rows else None
    lines = [f"{'layer':<24} {'kind':<6} {'alone dB':>9} {'weight dB':>9} {'input dB':>9} {'output dB':>9}"]
    for r in rows:
        mark = "  <- worst" if r is worst else ""
        lines.append(f"{r.layer:<24} {r.kind:<6} {r.layer_sqnr_db:9.1f} {r.weight_sqnr_db:9.1f} {r.input_sqnr_db:9.1f} {r.output_sqnr_db:9.1f}{mark}")
    return "\n".join(lines)


def _as_quantized_input(dq, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the quantizer that feeds this layer in the quantized graph (static or dynamic)."""
    qd = torch.ops.quantized_decomposed
    if dq.op != "call_function":
        return x
    if dq.target == qd.dequantize_per_tensor.default:
        scale, zero_point, qmin, qmax, dtype = dq.args[1:6]
        return qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(x, scale, zero_point, qmin, qmax, dtype),
                                                scale, zero_point, qmin, qmax, dtype)
    if dq.target == qd.dequantize_per_tensor.tensor:
        choose = dq.args[0].args[1].args[0]     # dequantize <- quantize(x, getitem(choose_qparams), ...)
        scale, zero_point = qd.choose_qparams.tensor(x, *choose.args[1:])
        qmin, qmax, dtype = dq.args[3:6]
        return qd.dequantize_per_tensor.tensor(qd.quantize_per_tensor.tensor(x, scale, zero_point, qmin, qmax, dtype),
                                               scale, zero_point, qmin, qmax, dtype)
    return x


def _dequantized_weight(layer):
    weight = layer.args[1]
    if weight.op == "call_function" and weight.target in (
        torch.ops.quantized_decomposed.dequantize_per_channel.default, torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    ):
        return weight
    return None


def _value(gm, arg):
    from deepshrink.quantization.graph_passes import get_attr_tensor

    return get_attr_tensor(gm, arg) if isinstance(arg, torch.fx.Node) else arg


def _batches(data: DataSplits, split: str, samples: int) -> list[torch.Tensor]:
    return data.batches(split, samples=samples, batch_size=128)


def _concat(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([r[name] for r in records]) for name in records[0]}
