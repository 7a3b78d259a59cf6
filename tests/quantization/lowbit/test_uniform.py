"""Uniform weight-only quantization: per-layer widths by pattern, exact grids, zeros kept, SQNR."""
from __future__ import annotations

import copy

import pytest
import torch

from deepshrink.ops.quant_math import qrange, sqnr_db
from deepshrink.quantization.api import quantize
from deepshrink.quantization.lowbit import WeightOnly, quantize_weights_, quantized_weights

from .conftest import small_lenet


def _levels_per_row(w: torch.Tensor) -> list[int]:
    return [torch.unique(row).numel() for row in w.reshape(w.shape[0], -1)]


def test_per_layer_widths_are_applied_by_pattern_through_the_verb():
    model = small_lenet()
    reference = copy.deepcopy(model)
    out = quantize(model, WeightOnly(bits=4, layers={"re:.*fc2": 8, "conv1": None, "*": 3}), data=None)
    assert out is model  # weight-only keeps the eager module, changed in place
    record = quantized_weights(model)
    assert {n: qw.bits for n, qw in record.items()} == {"conv2.weight": 3, "fc1.weight": 3, "fc2.weight": 8}
    assert model.conv1.weight.equal(reference.conv1.weight)  # None: left in float
    for name, bits in [("conv2", 3), ("fc1", 3), ("fc2", 8)]:
        w = getattr(model, name).weight.detach()
        qw = record[f"{name}.weight"]
        qmin, qmax = qrange(bits, True)
        # every weight is an integer multiple of its channel's scale, within the signed range
        scale = qw.scale.reshape(-1, *[1] * (w.dim() - 1))
        codes = torch.round(w / scale)
        assert torch.equal(w, codes * scale) and codes.min() >= qmin and codes.max() <= qmax
        assert max(_levels_per_row(w)) <= 2 ** bits
    assert all(torch.equal(getattr(model, n).bias, getattr(reference, n).bias) for n in ("conv1", "conv2", "fc1", "fc2"))


def test_first_matching_pattern_wins_and_unmatched_layers_get_the_default():
    model = small_lenet()
    quantize_weights_(model, WeightOnly(bits=5, layers={"fc1": 2, "re:fc.*": 6}))
    assert {n: qw.bits for n, qw in quantized_weights(model).items()} == {
        "conv1.weight": 5, "conv2.weight": 5, "fc1.weight": 2, "fc2.weight": 6}


@pytest.mark.parametrize("granularity,group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pruned_zeros_stay_exactly_zero(granularity, group_size, symmetric):
    model = small_lenet()
    w = model.fc1.weight
    with torch.no_grad():
        w.mul_((torch.arange(w.numel()) % 3 != 0).reshape(w.shape).float())
    zeros = w == 0
    quantize_weights_(model, WeightOnly(bits=3, symmetric=symmetric, granularity=granularity, group_size=group_size,
                                        layers={"fc1": 3, "*": None}))
    assert torch.all(model.fc1.weight[zeros] == 0)


def test_sqnr_grows_about_6_db_per_bit():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    sqnr = {}
    for bits in (2, 4, 6, 8):
        model = torch.nn.Sequential(torch.nn.Linear(256, 64))
        with torch.no_grad():
            model[0].weight.copy_(w)
        quantize_weights_(model, WeightOnly(bits=bits))
        sqnr[bits] = sqnr_db(w, model[0].weight.detach())
    steps = [sqnr[b + 2] - sqnr[b] for b in (4, 6)]
    assert all(11.0 < s < 13.0 for s in steps), sqnr  # 6.02 dB per bit
    assert sqnr[8] > 40.0


def test_per_group_beats_per_channel_beats_per_tensor_on_uneven_rows():
    torch.manual_seed(0)
    # rows whose halves differ 10x in scale: finer scales serve both halves
    w = torch.randn(8, 64) * torch.cat([torch.full((32,), 0.1), torch.ones(32)]) * torch.logspace(0, 1, 8)[:, None]
    sqnr = {}
    for granularity, group in [("per_tensor", None), ("per_channel", None), ("per_group", 32)]:
        model = torch.nn.Sequential(torch.nn.Linear(64, 8))
        with torch.no_grad():
            model[0].weight.copy_(w)
        quantize_weights_(model, WeightOnly(bits=4, granularity=granularity, group_size=group))
        sqnr[granularity] = sqnr_db(w, model[0].weight.detach())
    assert sqnr["per_group"] > sqnr["per_channel"] + 3 > sqnr["per_tensor"] + 6, sqnr


def test_asymmetric_uses_all_levels_of_a_one_sided_channel():
    model = torch.nn.Sequential(torch.nn.Linear(16, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.linspace(0.0, 1.5, 16).reshape(1, 16))
    quantize_weights_(model, WeightOnly(bits=4, symmetric=False))
    qw = quantized_weights(model)["0.weight"]
    assert sorted(qw.q.flatten().tolist()) == list(range(16))  # 16 weights on 16 distinct codes
    assert qw.zero_point.tolist() == [0]
