"""Int8Static on a constructed depthwise net: per-channel weight scales, ReLU6 fused into its
conv's pattern, explicit padding folded or shared, per-layer ranges, all-int8 XNNPACK lowering."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.quantization import Int8Static, activation_ranges, quantize
from deepshrink.quantization.graph_passes import float_graph, get_attr_tensor

from .conftest import labelled_by, make_mobile

QD = torch.ops.quantized_decomposed


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


@pytest.fixture(scope="module")
def quantized(mobile, mobile_data):
    return quantize(mobile, Int8Static(calibration="minmax"), data=mobile_data)


def test_weights_get_one_scale_per_output_channel(mobile, mobile_data, quantized):
    reference, _ = float_graph(mobile, mobile_data.example_input(), max_batch=1024)  # BN folded like quantize does
    float_weights = {n.name: get_attr_tensor(reference, n.args[1]) for n in reference.graph.nodes
                     if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)}
    checked = 0
    for layer in quantized.graph.nodes:
        if layer.name not in float_weights:
            continue
        dq = layer.args[1]
        assert dq.target == QD.dequantize_per_channel.default and dq.args[3] == 0   # axis 0 = output channels
        scale = get_attr_tensor(quantized, dq.args[1])
        w = float_weights[layer.name]
        expected = (w.abs().reshape(w.shape[0], -1).amax(1) / 127).clamp(min=2**-12)   # symmetric int8, codes -127..127
        torch.testing.assert_close(scale.float(), expected, rtol=1e-6, atol=0)
        checked += 1
    assert checked == 4   # stem, depthwise, pointwise, fc


def test_relu6_is_quantized_after_the_clamp_not_before(mobile, mobile_data, quantized):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    clamps = _nodes(quantized, torch.ops.aten.hardtanh.default)
    assert len(clamps) == 2
    for clamp in clamps:
        assert clamp.args[0].target == torch.ops.aten.conv2d.default   # no quantize between conv and clamp
        (q,) = clamp.users
        assert q.target == QD.quantize_per_tensor.default and q.args[2] == -128   # zero point at the low end: range [0, max]
        assert 0 < q.args[1] * 255 <= 6.0 + 1e-6                                 # never wider than ReLU6's [0, 6]
    # the stock quantizer observes the conv output instead: its grid spends codes on negative values
    reference, _ = float_graph(mobile, mobile_data.example_input(), max_batch=1024)
    stock_quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    stock_quantizer.SUPPORTED_PATTERNS = [p for p in stock_quantizer.SUPPORTED_PATTERNS if "_bn" not in p.name]  # QAT-only, slow
    stock = prepare_pt2e(reference, stock_quantizer)
    for x, _ in mobile_data.loader("calib", batch_size=128):
        stock(x)
    stock = convert_pt2e(stock)
    stock_clamp = _nodes(stock, torch.ops.aten.hardtanh.default)[0]
    assert stock_clamp.args[0].target == QD.dequantize_per_tensor.default
    assert stock_clamp.args[0].args[2] > -128   # its zero point: part of the int8 range covers pre-activation negatives


def test_symmetric_padding_folds_into_the_conv(quantized):
    assert not _nodes(quantized, torch.ops.aten.pad.default)
    depthwise = [n for n in _nodes(quantized, torch.ops.aten.conv2d.default) if len(n.args) > 6 and n.args[6] == 8]
    assert len(depthwise) == 1 and list(depthwise[0].args[4]) == [1, 1]


class AsymmetricPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.conv2(nn.functional.pad(torch.relu(self.conv1(x)), (0, 1, 0, 1))).flatten(1)


def test_asymmetric_padding_shares_its_input_quantizer():
    torch.manual_seed(0)
    model = AsymmetricPad().eval()
    q = quantize(model, Int8Static(), data=labelled_by(model, n=64, shape=(1, 9, 9)))
    (pad,) = _nodes(q, torch.ops.aten.pad.default)
    before, (after,) = pad.args[0], pad.users
    assert before.target == QD.dequantize_per_tensor.default and after.target == QD.quantize_per_tensor.default
    assert before.args[1:3] == after.args[1:3]   # same scale and zero point: padding is exact in int8


def test_activation_ranges_name_each_layer_and_match_the_graph(quantized):
    rows = activation_ranges(quantized)
    assert [r["layer"] for r in rows] == ["input", "stem.2", "dw.3", "pw.2", "fc"]
    q_nodes = {n.args[0].name: n for n in _nodes(quantized, QD.quantize_per_tensor.default)}
    for r in rows:
        q = q_nodes[r["node"]]
        assert r["scale"] == pytest.approx(q.args[1], rel=1e-6) and r["zero_point"] == q.args[2]
        assert r["min"] == pytest.approx((-128 - r["zero_point"]) * r["scale"])
        assert r["clip_min"] == r["observed_min"] and r["clip_max"] == r["observed_max"]   # minmax clips nothing
    assert quantized._deepshrink_quant["scheme"] == "Int8Static"


def test_percentile_calibration_clips_where_minmax_does_not(mobile, mobile_data, quantized):
    clipped = quantize(mobile, Int8Static(calibration="percentile", percentile=99.0, calibration_samples=64), data=mobile_data)
    rows = {r["layer"]: r for r in activation_ranges(clipped)}
    full = {r["layer"]: r for r in activation_ranges(quantized)}
    assert clipped._deepshrink_quant["calibration_samples_used"] == 64
    for layer in ("input", "pw.2", "fc"):
        assert rows[layer]["clip_max"] < rows[layer]["observed_max"]
        assert rows[layer]["scale"] < full[layer]["scale"]


def test_the_quantized_mobile_net_lowers_to_xnnpack_entirely(quantized, mobile_data):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from deepshrink.core.graph import capture

    lowered = to_edge_transform_and_lower(capture(quantized, mobile_data.example_input(4)), partitioner=[XnnpackPartitioner()])
    outside = {str(n.target).split(".")[-2] for n in lowered.exported_program().graph.nodes
               if n.op == "call_function" and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)}
    # every conv, clamp, pool, linear and (de)quantize runs in XNNPACK; only the flatten's reshape on the
    # dynamic batch dimension stays outside (in int8, between two delegate calls)
    assert outside <= {"sym_size", "view_copy"}


def test_fp32_layers_must_match_a_module(mobile, mobile_data):
    with pytest.raises(ConfigError, match=r"fp32_layers: 'stem\.9' matches no layer; layers are: stem, stem\.0"):
        quantize(mobile, Int8Static(fp32_layers=("stem.9",)), data=mobile_data)


def test_fp32_layers_stay_float(mobile, mobile_data):
    q = quantize(mobile, Int8Static(fp32_layers=("fc",)), data=mobile_data)
    (linear,) = _nodes(q, torch.ops.aten.linear.default)
    assert linear.args[1].op == "get_attr"   # a float weight, no dequantize
    assert all(u.target != QD.quantize_per_tensor.default for u in linear.users)
