"""Cross-layer equalization: float outputs unchanged, per-channel ranges equal across each pair."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.quantization.equalization import (
    equalization_scales, equalize_graph, input_channel_ranges, output_channel_ranges,
)
from deepshrink.quantization.graph_passes import float_graph, get_attr_tensor

from .conftest import make_mobile


def test_scales_are_the_geometric_mean_rule():
    s = equalization_scales(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]))
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0]))   # sqrt(r1 / r2); a dead channel keeps 1


def test_input_ranges_of_a_depthwise_and_a_grouped_weight():
    w = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(4, 1, 3) - 5  # depthwise: out 4, in/groups 1
    torch.testing.assert_close(input_channel_ranges(w, groups=4), w.abs().amax(dim=(1, 2)))
    g = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))  # 2 groups of 3 out x 2 in
    expected = torch.stack([g[3 * (i // 2): 3 * (i // 2) + 3, i % 2].abs().max() for i in range(4)])
    torch.testing.assert_close(input_channel_ranges(g, groups=2), expected)


def _run(gm, x):
    with torch.no_grad():
        return gm(x)


def test_cle_keeps_the_float_outputs_and_equalizes_relu_pairs():
    model = make_mobile(act=nn.ReLU)
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    plain, _ = float_graph(model, x[:1], max_batch=64)
    equalized, report = float_graph(model, x[:1], max_batch=64, equalization="cle")
    torch.testing.assert_close(_run(equalized, x), model(x).detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(_run(plain, x), model(x).detach(), rtol=0, atol=1e-5)
    assert [(r["first"], r["second"]) for r in report] == [("stem.0", "dw.1"), ("dw.1", "pw.0")]
    for r in report:
        assert r["ratio_before"] > 1.5 and r["ratio_after"] == pytest.approx(1.0, abs=1e-3)
    # the depthwise conv's per-channel ranges now agree with its neighbours'
    convs = [n for n in equalized.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    stem_w, dw_w = (get_attr_tensor(equalized, c.args[1]) for c in convs[:2])
    torch.testing.assert_close(output_channel_ranges(stem_w), input_channel_ranges(dw_w, groups=8), rtol=1e-3, atol=0)


def test_relu6_pairs_are_skipped_or_converted_on_request():
    model = make_mobile(act=nn.ReLU6)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    _, report = float_graph(model, x[:1], max_batch=64, equalization="cle")
    skipped = [r for r in report if r["second"] is None]
    assert [r["first"] for r in skipped] == ["stem.0", "dw.1"] and "not scale-equivariant" in skipped[0]["reason"]
    converted, report = float_graph(model, x[:1], max_batch=64, equalization="cle_relu6_as_relu")
    assert len([r for r in report if r["second"]]) == 2
    assert not [n for n in converted.graph.nodes if n.target == torch.ops.aten.hardtanh.default]
    relu_model = make_mobile(act=nn.ReLU)   # same weights: ReLU6 -> ReLU is exactly the documented change
    torch.testing.assert_close(_run(converted, x), relu_model(x).detach(), rtol=0, atol=1e-5)


def test_linear_pairs_equalize_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([100.0, 1, 0.01, 1, 1]).unsqueeze(1))
    x = torch.randn(16, 6)
    gm, _ = float_graph(model, x[:1], max_batch=64)
    report = equalize_graph(gm)
    torch.testing.assert_close(_run(gm, x), model(x).detach(), rtol=1e-5, atol=1e-5)
    assert report[0]["ratio_before"] > 20 and report[0]["ratio_after"] == pytest.approx(1.0, abs=1e-4)


class _ClampedPair(nn.Module):
    """conv -> clamp(min=0) (ReLU written as a clamp, as some converters emit it) -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.a.weight.mul_(torch.tensor([50.0, 1, 0.02, 1]).reshape(4, 1, 1, 1))

    def forward(self, x):
        return self.b(torch.clamp(self.a(x), min=0))


def test_a_clamp_without_upper_bound_is_equalized_like_relu():
    torch.manual_seed(0)
    model = _ClampedPair().eval()
    x = torch.randn(8, 1, 8, 8)
    gm, report = float_graph(model, x[:1], max_batch=64, equalization="cle")
    assert [(r["first"], r["second"], r["changes_float_model"]) for r in report] == [("a", "b", False)]
    assert float((_run(gm, x) - model(x).detach()).abs().max()) < 1e-5


def test_the_guard_drops_relu6_as_relu_where_it_lowers_int8_fidelity(mobile, mobile_data):
    from deepshrink.quantization import Int8Static, quantize

    plain = quantize(mobile, Int8Static(per_channel=False), data=mobile_data)
    guarded = quantize(mobile, Int8Static(per_channel=False, equalization="cle_relu6_as_relu"), data=mobile_data)
    record = guarded._deepshrink_quant["equalization"]
    assert record["changes_float_model"] and not record["applied"]
    assert record["fidelity_with"]["sqnr_db"] < record["fidelity_without"]["sqnr_db"]
    x = torch.stack([mobile_data.test[i][0] for i in range(32)])
    torch.testing.assert_close(_run(guarded, x), _run(plain, x), rtol=0, atol=0)   # exactly the unequalized model


def test_the_guard_keeps_exact_cle_where_it_helps():
    from deepshrink.quantization import Int8Static, quantize

    from .conftest import labelled_by

    model = make_mobile(act=nn.ReLU)
    q = quantize(model, Int8Static(per_channel=False, equalization="cle"), data=labelled_by(model))
    record = q._deepshrink_quant["equalization"]
    assert record["applied"] and not record["changes_float_model"] and len(record["pairs"]) == 2
    assert record["fidelity_with"]["sqnr_db"] >= record["fidelity_without"]["sqnr_db"]
