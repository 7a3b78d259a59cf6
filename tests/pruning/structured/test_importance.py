"""Group importance against scores computed by hand from the coupled slices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.pruning.structured import analyze_channels, bn_scale_scores, magnitude_scores, taylor_scores

from .conftest import ConvBnConv, FlattenLinear, randomize_batch_norms


def test_l1_and_l2_add_producer_rows_and_every_consumer_column_behind_a_flatten():
    torch.manual_seed(0)
    model = FlattenLinear().eval()
    graph = analyze_channels(model, torch.randn(2, 1, 6, 6))
    groups = graph.groups()
    conv_w, fc_w = model.conv.weight.detach().double(), model.fc.weight.detach().double()
    # channel c of conv feeds fc columns 16c .. 16c+15
    l1 = conv_w.abs().flatten(1).sum(1) + fc_w.abs().reshape(12, 8, 16).sum((0, 2))
    l2 = (conv_w.square().flatten(1).sum(1) + fc_w.square().reshape(12, 8, 16).sum((0, 2))).sqrt()
    got_l1, got_l2 = magnitude_scores(model, graph, groups, "l1"), magnitude_scores(model, graph, groups, "l2")
    assert torch.allclose(got_l1[0], l1, rtol=1e-12) and torch.allclose(got_l2[0], l2, rtol=1e-12)
    fc_l1 = fc_w.abs().sum(1) + model.out.weight.detach().double().abs().sum(0)
    assert torch.allclose(got_l1[1], fc_l1, rtol=1e-12)


def test_bn_scale_is_the_absolute_gamma_and_needs_a_batch_norm():
    torch.manual_seed(0)
    model = randomize_batch_norms(ConvBnConv())
    with torch.no_grad():
        model.bn.weight[3] = -2.0
    graph = analyze_channels(model, torch.randn(2, 3, 8, 8))
    scores = bn_scale_scores(model, graph, graph.groups())
    assert torch.equal(scores[0], model.bn.weight.detach().double().abs())
    no_bn = FlattenLinear().eval()
    graph = analyze_channels(no_bn, torch.randn(2, 1, 6, 6))
    with pytest.raises(ConfigError, match=r"group conv has none; skip it \(skip=\('conv',\)\) or use 'l1'"):
        bn_scale_scores(no_bn, graph, graph.groups())


def test_taylor_squares_the_summed_first_order_terms_per_batch_then_averages():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    graph = analyze_channels(model, batches[0][0])
    groups = graph.groups()
    assert [g.name for g in groups] == ["0"]
    expected = torch.zeros(6, dtype=torch.float64)
    for x, y in batches:
        w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
        g1, gb1, g2 = torch.autograd.grad(F.cross_entropy(model(x), y), [w1, b1, w2])
        term = (w1 * g1).sum(1) + b1 * gb1 + (w2 * g2).sum(0)
        expected += term.detach().double().square()
    got = taylor_scores(model, graph, groups, batches)[0]
    assert torch.allclose(got, expected / 3, rtol=1e-6, atol=1e-12)
