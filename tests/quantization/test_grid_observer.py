"""An int8 quantizer keeps the grid a weight is already on (weight QAT, weight-only)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver

import deepshrink
from deepshrink.data.splits import from_samples
from deepshrink.deploy import export
from deepshrink.quantization import Int8Static, WeightOnly
from deepshrink.quantization.observers import GridPreservingWeightObserver

pytestmark = pytest.mark.usefixtures("one_thread")


def observed(observer_type, weight: torch.Tensor, qmax: int = 127):
    observer = observer_type(dtype=torch.int8, quant_min=-qmax, quant_max=qmax, qscheme=torch.per_channel_symmetric,
                             ch_axis=0, eps=2**-12)
    observer(weight)
    return observer.calculate_qparams()


def test_a_weight_on_a_grid_gets_the_grid_scales_and_a_float_weight_the_usual_ones():
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(16, 1, generator=g) * 0.1 + 0.01
    on_grid = torch.randint(-7, 8, (16, 40), generator=g).float() * scales
    on_grid[:, 0] = 7 * scales[:, 0]   # every row reaches code 7
    scale, zero = observed(GridPreservingWeightObserver, on_grid)
    assert torch.equal(scale, scales.flatten()) and not zero.any()
    assert torch.equal(torch.round(on_grid / scale[:, None]) * scale[:, None], on_grid)   # the codes rebuild it exactly
    float_weight = torch.randn(16, 40, generator=g)
    for weight in (float_weight, on_grid * 127 / 7 + 1e-4):   # not on a grid; on none within 1e-3
        assert all(torch.equal(a, b) for a, b in zip(observed(GridPreservingWeightObserver, weight),
                                                     observed(PerChannelMinMaxObserver, weight)))
    # a grid finer than the range (codes up to 127, weights limited to 63): the usual scales
    fine = torch.randint(-127, 128, (16, 40), generator=g).float() * scales
    assert torch.equal(observed(GridPreservingWeightObserver, fine, 63)[0], observed(PerChannelMinMaxObserver, fine, 63)[0])


def test_int8_static_after_4bit_weights_keeps_their_codes_and_the_onnx_stores_them_at_4_bits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(196, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[layer.weight.abs() < layer.weight.abs().flatten().quantile(0.8)] = 0.0
    four = deepshrink.quantize(copy.deepcopy(model), WeightOnly(bits=4), data=None)
    x = torch.randn(64, 196, generator=torch.Generator().manual_seed(1))
    int8 = deepshrink.quantize(copy.deepcopy(four), Int8Static(), data=from_samples(calib=list(x), eval=list(x)),
                               target="onnxruntime")
    codes = [b for name, b in int8.named_buffers() if b.dtype == torch.int8 and b.dim() == 2]
    assert [tuple(c.shape) for c in codes] == [(64, 196), (10, 64)]
    assert all(int(c.abs().max()) == 7 for c in codes)   # the 4-bit grid's codes, not re-rounded onto [-63, 63]
    result = export(int8, tmp_path / "m.onnx", example_input=x[:8])
    stored = json.loads((tmp_path / "m.onnx.json").read_text())["stored_weights"]
    assert [(w["shape"], w["encoding"]) for w in stored] == [([64, 196], "sparse 4-bit"), ([10, 64], "sparse 4-bit")]
    assert result.parity_passed
    np.testing.assert_array_equal(codes[0].numpy() == 0, four[0].weight.detach().numpy() == 0)   # the pruned zeros stay
