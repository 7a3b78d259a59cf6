"""A PT2E-quantized graph counts its own MACs and weights: the same MACs as its float model,
each int8 weight once, no scales or zero points."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.core.counting import count_macs, parameter_counts
from deepshrink.quantization import Int8Dynamic, Int8Static, quantize

# TinyMobile after batch-norm folding: every conv gets a bias
FOLDED_WEIGHTS = (8 * 9 + 8) + (8 * 9 + 8) + (16 * 8 + 16) + (10 * 16 + 10)
MACS = 8 * 8 * 8 * 9 + 8 * 8 * 8 * 9 + 16 * 8 * 8 * 8 + 16 * 10   # 16x16 input, stride-2 stem -> 8x8


@pytest.fixture(scope="module", params=["static", "dynamic"])
def quantized(request, mobile, mobile_data):
    config = Int8Static(calibration="minmax", calibration_samples=64) if request.param == "static" else Int8Dynamic()
    return quantize(mobile, config, data=mobile_data)


def test_quantized_graph_counts_the_float_models_macs(mobile, mobile_data, quantized):
    x = mobile_data.example_input(1)
    assert count_macs(mobile, x) == MACS == 17_568
    assert count_macs(quantized, x) == MACS


def test_quantized_graph_counts_each_weight_once(quantized):
    int8 = [t for t in list(quantized.buffers()) if t.dtype == torch.int8]
    assert int8, "the converted graph stores no int8 weight"
    total, nonzero = parameter_counts(quantized)
    assert total == FOLDED_WEIGHTS == 474
    assert nonzero <= total


def test_float_copies_left_registered_are_not_counted(mobile, mobile_data):
    gm = quantize(mobile, Int8Static(calibration="minmax", calibration_samples=64), data=mobile_data)
    # what a conversion that keeps the originals looks like: registered, never read by the graph
    gm.register_parameter("fc_weight_float", nn.Parameter(torch.randn(10, 16)))
    gm.register_buffer("stem_weight_float", torch.randn(8, 1, 3, 3))
    assert parameter_counts(gm)[0] == FOLDED_WEIGHTS
