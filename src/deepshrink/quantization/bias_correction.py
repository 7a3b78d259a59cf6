"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2, empirical variant).

Quantizing weights and activations shifts each layer's expected output: ``E[W_q x_q] != E[W x]``.
Over calibration data, ``bias += E[y_float] - E[y_quant]`` per output channel, layer by layer
in graph order (a correction changes every later layer's input, so each layer is measured
after the ones before it were corrected). The correction is a change of the float bias that
XNNPACK and ONNX Runtime read at export, so it reaches the runtime.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from deepshrink.data.splits import DataSplits
from deepshrink.quantization.graph_passes import bias_node, get_attr_tensor, record_nodes, set_attr_tensor, weighted_nodes
from deepshrink.quantization.quantizer import layer_name


def channel_means(gm: GraphModule, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Mean of each named node's output per channel (dim 1), over all samples and positions."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    for x in batches:
        for name, value in record_nodes(gm, x, set(names)).items():
            flat = value.detach().double().transpose(0, 1).reshape(value.shape[1], -1)
            sums[name] = sums.get(name, 0) + flat.sum(dim=1)
            count[name] = count.get(name, 0) + flat.shape[1]
    return {name: (sums[name] / count[name]).float() for name in sums}


def calibration_batches(data: DataSplits, samples: int, batch_size: int = 128) -> list[torch.Tensor]:
    return data.batches("calib", samples=samples, batch_size=batch_size)


def correct_bias(quantized: GraphModule, reference: GraphModule, batches: list[torch.Tensor]) -> list[dict]:
    """Correct ``quantized``'s conv/linear biases in place toward ``reference`` (the float graph
    it was quantized from, same node names). Returns ``{layer, node, mean_abs_shift_before,
    mean_abs_shift_after}`` per layer: the mean over channels of ``|E[y_float] - E[y_quant]|``."""
    layers = [n for n in weighted_nodes(quantized) if _is_quantized(n)]
    reference_names = {n.name for n in weighted_nodes(reference)}
    layers = [n for n in layers if n.name in reference_names]
    target = channel_means(reference, batches, [n.name for n in layers])
    report = []
    for layer in layers:
        before = channel_means(quantized, batches, [layer.name])[layer.name]
        shift = target[layer.name] - before
        node = bias_node(quantized, layer, create=True)
        with torch.no_grad():
            set_attr_tensor(quantized, node, get_attr_tensor(quantized, node) + shift.to(get_attr_tensor(quantized, node).dtype))
        after = channel_means(quantized, batches, [layer.name])[layer.name]
        report.append({
            "layer": layer_name(layer), "node": layer.name,
            "mean_abs_shift_before": float(shift.abs().mean()), "mean_abs_shift_after": float((target[layer.name] - after).abs().mean()),
        })
    return report


def _is_quantized(layer) -> bool:
    weight = layer.args[1]
    return weight.op == "call_function" and "dequantize" in str(weight.target)
