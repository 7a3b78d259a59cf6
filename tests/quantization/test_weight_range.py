"""Guarded int8 layouts: 7-bit weights only in the output channels whose AVX2 pair sums come near int16.

Every assertion holds on any CPU: the peaks are computed by the integer emulation, not the machine's kernel.
"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepshrink.core.targets import common_int8_layout, get_target
from deepshrink.data import from_datasets
from deepshrink.deploy import export
from deepshrink.quantization import Int8Static, quantize
from deepshrink.quantization.saturation import emulate_x86_without_vnni
from deepshrink.quantization.weight_range import NARROW

from .test_saturation import saturating

_QD = torch.ops.quantized_decomposed


def _weights(q) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per conv/linear node of a converted graph: (int8 codes, per-channel scales)."""
    out = {}
    for node in q.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            dq = node.args[1]
            codes = getattr(q, dq.args[0].target)
            scale = getattr(q, dq.args[1].target)
            out[node.name] = (codes, scale)
    return out


def _half_saturating() -> tuple[nn.Module, object]:
    """A conv whose first 4 output channels have equal large positive weights (every u8 x s8 pair of
    a full-range layout overflows int16) and whose last 4 have two nonzero weights, never in one pair.
    No channel is on a coarse grid (whose codes the int8 observer would keep: ``quantization.observers``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    with torch.no_grad():
        model[0].weight[:4] = 0.05 - torch.rand(4, 4, 3, 3) * 5e-4
        model[0].weight[4:].zero_()                         # one full-range code per channel, its pair partner 0:
        model[0].weight[4:, 0, 0, 0] = 0.05                 # at most 255 * 127 = 32,385, inside int16
        model[0].weight[4:, 1, 1, 1] = -0.0201              # 0.402 of the peak: on no grid of 127 codes or fewer
        model[0].bias.zero_()
        model[3].weight.copy_(torch.randn(10, 288) * 0.02)
    x = torch.rand(96, 4, 8, 8) * 0.1 + 0.9
    x[:, :, 0, 0] = 0.0
    y = model(x).argmax(1)
    return model, from_datasets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), val=TensorDataset(x[64:], y[64:]),
                                num_classes=10, calib_size=64)


def test_only_the_channels_that_come_near_int16_are_narrowed():
    model, data = _half_saturating()
    full = quantize(model, Int8Static(int8_layout="u8s8", calibration="minmax"), data=data, target="onnxruntime")
    guarded = quantize(model, Int8Static(int8_layout="u8s8-guarded", calibration="minmax"), data=data, target="onnxruntime")
    record = guarded._deepshrink_quant["weight_range"]
    assert record["layers"]["conv2d"]["narrowed"] == 4
    (full_codes, full_scale), (codes, scale) = _weights(full)["conv2d"], _weights(guarded)["conv2d"]
    # the 4 saturating channels: 7-bit codes, scale 127/63 of the full-range one, re-rounded from the float weights
    assert int(codes[:4].abs().max()) == NARROW
    assert torch.allclose(scale[:4], full_scale[:4] * 127 / 63, rtol=1e-6)
    w = model[0].weight.detach()
    assert torch.equal(codes[:4], torch.clamp(torch.round(w[:4] / scale[:4].reshape(-1, 1, 1, 1)), -63, 63).to(torch.int8))
    # the others keep full range, bit for bit
    assert torch.equal(codes[4:], full_codes[4:]) and int(codes[4:].abs().max()) == 127
    x = torch.stack([data.calib[i][0] for i in range(64)])
    assert emulate_x86_without_vnni(full, x)[1].total_saturated > 0
    assert emulate_x86_without_vnni(guarded, x)[1].total_saturated == 0


def test_a_fully_saturating_net_is_narrowed_everywhere_and_exports(tmp_path):
    model, data = saturating()
    guarded = quantize(model, Int8Static(calibration="minmax"), data=data, target="onnxruntime")
    assert guarded._deepshrink_quant["int8_layout"] == "u8s8-guarded"          # the onnxruntime target's default
    record = guarded._deepshrink_quant["weight_range"]
    assert record["narrowed"] == record["channels"] == 8 + 10
    x = torch.stack([data.test[i][0] for i in range(16)])
    result = export(guarded, tmp_path / "g.onnx", example_input=x)
    real, emulated = result.parity                                             # checked against the AVX2 kernel too
    assert real.passed and emulated.passed


def test_guarded_weights_are_closer_to_float_than_reduced_ones_and_the_output_too():
    """The point of guarding: 7-bit weights cost precision in every channel; here only 4 channels need them."""
    model, data = _half_saturating()
    w = model[0].weight.detach()
    x = torch.stack([data.test[i][0] for i in range(32)])
    with torch.no_grad():
        ref = model(x)

    def errors(layout):
        q = quantize(model, Int8Static(int8_layout=layout, calibration="minmax"), data=data, target="onnxruntime")
        codes, scale = _weights(q)["conv2d"]
        squared = (codes.float() * scale.reshape(-1, 1, 1, 1) - w).pow(2)
        out, report = emulate_x86_without_vnni(q, x)                       # what an AVX2-only CPU computes
        assert report.total_saturated == 0
        return (float(squared[:4].sum()), float(squared[4:].sum())), float((out - ref).pow(2).mean())

    (w_guarded, out_guarded), (w_reduced, out_reduced) = errors("u8s8-guarded"), errors("u8s8-reduced")
    assert w_guarded[0] == w_reduced[0]           # the 4 saturating channels: 7 bits in both
    # the 4 kept channels' codes are 2x finer, so their squared error 4x smaller
    assert w_guarded[1] < 0.3 * w_reduced[1], (w_guarded, w_reduced)
    assert out_guarded < out_reduced, (out_guarded, out_reduced)     # measured MSE 4.63e-5 vs 4.67e-5


def test_a_pte_and_onnx_recipe_shares_the_signed_guarded_layout(tmp_path):
    assert common_int8_layout(("pte", "onnx"), get_target("xnnpack")) == "s8s8-guarded"
    assert common_int8_layout(("pte",), get_target("xnnpack")) == "s8s8"
    model, data = _half_saturating()
    q = quantize(model, Int8Static(int8_layout="s8s8-guarded", calibration="minmax"), data=data, target="xnnpack")
    assert q._deepshrink_quant["weight_range"]["layers"]["conv2d"]["narrowed"] == 4
    x = torch.stack([data.test[i][0] for i in range(8)])
    for suffix in (".pte", ".onnx"):
        assert export(q, tmp_path / f"g{suffix}", example_input=x).parity_passed


def test_adaround_re_rounds_narrowed_channels_within_7_bits():
    model, data = _half_saturating()
    q = quantize(model, Int8Static(int8_layout="u8s8-guarded", calibration="minmax", rounding="adaround"), data=data,
                 target="onnxruntime")
    codes, _ = _weights(q)["conv2d"]
    assert q._deepshrink_quant["weight_range"]["layers"]["conv2d"]["narrowed"] == 4
    assert int(codes[:4].abs().max()) <= NARROW
    x = torch.stack([data.calib[i][0] for i in range(64)])
    assert emulate_x86_without_vnni(q, x)[1].total_saturated == 0


def test_the_guard_says_what_it_narrowed_in_the_log_and_the_report(caplog):
    import logging

    from deepshrink.quantization.weight_range import weight_range_line
    from deepshrink.report.html import render_report

    model, data = _half_saturating()
    with caplog.at_level(logging.INFO, logger="deepshrink"):
        guarded = quantize(model, Int8Static(int8_layout="u8s8-guarded", calibration="minmax"), data=data, target="onnxruntime")
    record = guarded._deepshrink_quant["weight_range"]
    assert (record["narrowed"], record["channels"]) == (11, 18)   # the conv's 4 of 8, and 7 of the head's 10
    line = "saturation guard: 11 of 18 weight channels narrowed to 7 bits in 2 layers ("
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("saturation guard")] == [weight_range_line(record)]
    assert weight_range_line(record).startswith(line)
    # with AdaRound the guard runs twice; the line, once, counts both passes (the second alone lists only what it narrowed)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepshrink"):
        rounded = quantize(model, Int8Static(int8_layout="u8s8-guarded", calibration="minmax", rounding="adaround"), data=data,
                           target="onnxruntime")
    merged = rounded._deepshrink_quant["weight_range"]
    assert merged["rounds"] > record["rounds"] and merged["narrowed"] >= 11
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("saturation guard")] == [weight_range_line(merged)]
    assert record["layers"]["conv2d"]["layer"] == "0"   # the Sequential's first module
    stage = {"index": 0, "stage": {"quantize": {}}, "seconds": 1.0, "summary": {"line": "x", "weight_range": record}}
    page = render_report({"variants": {}, "shipped": None, "stages": [stage]}, title="t")
    assert "without VNNI would clip: 11 of 18 channels</h3>" in page
    row = next(r for r in page.split("</tr>") if "<td>conv2d</td>" in r)
    assert "<td>8</td><td>4</td>" in row and "50" in row
    # nothing narrowed: no section
    stage["summary"]["weight_range"] = {**record, "narrowed": 0, "layers": {}}
    assert "would clip" not in render_report({"variants": {}, "shipped": None, "stages": [stage]}, title="t")
