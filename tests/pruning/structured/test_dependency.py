"""Dependency analysis on constructed graphs: the groups it finds, and shrunk == masked."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ExportError
from deepshrink.models.mobile import mobile_cnn
from deepshrink.pruning.structured import UnprunableLayerWarning, analyze_channels

from .conftest import (
    Concat, ConvBnConv, ConvConv, Depthwise, FlattenLinear, Residual, SqueezeExcite, masked_and_shrunk, randomize_batch_norms,
)


def groups_of(graph):
    return [(g.layers, g.multiplicity, g.size) for g in graph.groups()]


def check_equal(model, x, *, ratio=0.5, multiple=1):
    """Prune half of every group; the shrunk model must equal the masked one and be narrower."""
    masked, shrunk, graph, groups = masked_and_shrunk(model, x, ratio=ratio, multiple=multiple)
    with torch.no_grad():
        expected, got, dense = masked(x), shrunk(x), model(x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-5
    assert float((dense - expected).abs().max()) > 1e-3  # the masking really changed something
    return shrunk, groups


@pytest.mark.parametrize("klass, x_shape, expected", [
    (ConvConv, (2, 3, 8, 8), [(("conv1",), (1,), 16)]),
    (ConvBnConv, (2, 3, 8, 8), [(("conv1",), (1,), 16)]),
    (Residual, (2, 3, 8, 8), [(("stem", "a.3", "b"), (1, 1, 1), 16), (("a.0",), (1,), 24)]),
    (Concat, (2, 3, 4, 4), [(("p", "r"), (1, 1), 8), (("q", "r"), (1, 1), 16)]),
    (Depthwise, (2, 3, 8, 8), [(("expand",), (1,), 16)]),
    (FlattenLinear, (2, 1, 6, 6), [(("conv",), (1,), 8), (("fc",), (1,), 12)]),
    (SqueezeExcite, (2, 3, 6, 6), [(("conv", "fc2"), (1, 1), 16), (("fc1",), (1,), 8)]),
])
def test_each_coupling_forms_the_expected_groups_and_shrinks_exactly(klass, x_shape, expected):
    torch.manual_seed(0)
    model = randomize_batch_norms(klass())
    x = torch.randn(*x_shape)
    shrunk, groups = check_equal(model, x)
    assert [(g.layers, g.multiplicity, g.size) for g in groups] == expected
    # every group lost half of its channels in every layer it spans
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in shrunk.parameters()) < 0.75 * before


def test_residual_branches_shrink_together():
    torch.manual_seed(0)
    shrunk, _ = check_equal(randomize_batch_norms(Residual()), torch.randn(2, 3, 8, 8))
    assert (shrunk.stem.out_channels, shrunk.a[0].in_channels, shrunk.a[3].out_channels, shrunk.a[4].num_features) == (8, 8, 8, 8)
    assert (shrunk.a[0].out_channels, shrunk.a[1].num_features) == (12, 12)  # the inner expansion is its own group
    assert (shrunk.b.in_channels, shrunk.b.out_channels, shrunk.head.in_channels, shrunk.head.out_channels) == (8, 8, 8, 4)


def test_concat_offsets_pair_each_half_with_its_own_source():
    torch.manual_seed(0)
    shrunk, _ = check_equal(Concat(), torch.randn(2, 3, 4, 4))
    assert (shrunk.p.out_channels, shrunk.q.out_channels, shrunk.r.out_channels, shrunk.head.in_channels) == (4, 8, 12, 12)


def test_depthwise_keeps_in_equal_out_and_its_multiplier():
    torch.manual_seed(0)
    shrunk, _ = check_equal(randomize_batch_norms(Depthwise()), torch.randn(2, 3, 8, 8))
    assert (shrunk.dw.in_channels, shrunk.dw.out_channels, shrunk.dw.groups, shrunk.bn.num_features) == (8, 8, 8, 8)
    assert (shrunk.dw2.in_channels, shrunk.dw2.out_channels, shrunk.dw2.groups, shrunk.project.in_channels) == (8, 16, 8, 16)


@pytest.mark.parametrize("use_view", [False, True])
def test_flatten_maps_each_channel_to_its_spatial_features(use_view):
    torch.manual_seed(0)
    shrunk, _ = check_equal(FlattenLinear(use_view), torch.randn(2, 1, 6, 6))
    assert (shrunk.conv.out_channels, shrunk.fc.in_features, shrunk.fc.out_features, shrunk.out.in_features) == (4, 64, 6, 6)


def test_mobile_cnn_groups_follow_its_residuals_and_concat():
    torch.manual_seed(0)
    model = randomize_batch_norms(mobile_cnn())
    shrunk, groups = check_equal(model, torch.randn(2, 1, 28, 28), multiple=8)
    assert [g.name for g in groups] == [
        "stem.0 + block1.project.0", "block1.expand.0", "block2.expand.0", "block2.project.0 + block3.project.0 + block5.project.0",
        "block3.expand.0", "block4.branch.expand.0", "block4.branch.project.0 + block5.project.0", "block5.expand.0", "head.0",
    ]
    assert shrunk.structured_widths() == {"stem": 8, "expand": [32, 48, 64, 64, 96], "mid": 16, "branch": 16, "head": 128, "num_classes": 10}
    assert shrunk.block5.project[0].out_channels == 32 and shrunk.classifier.in_features == 128


class Unprunable(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(3, 16, 3)
        self.act = nn.PReLU(16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=2)
        self.scale = nn.Parameter(torch.ones(16, 1, 1))
        self.fc = nn.Linear(16 * 4 * 4, 4)
        self.other = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if self.case == "prelu":
            y = self.act(y)
        elif self.case == "grouped":
            y = self.grouped(y)
        elif self.case == "parameter":
            y = y * self.scale
        y = torch.relu(self.other(x)).sum(1, keepdim=True) + y  # `other` is never prunable: it is summed over channels
        y = F.adaptive_avg_pool2d(y, 4)
        return self.fc(y.view(-1, 256) if self.case == "literal_view" else y.flatten(1))


@pytest.mark.parametrize("case, where", [
    ("prelu", r"aten\.prelu in 'act' \(PReLU\)"),
    ("grouped", r"'grouped' \(Conv2d\) unpruned: grouped convolution \(groups=2\)"),
    ("parameter", r"aten\.mul .*per-channel values"),
    ("literal_view", r"aten\.view .*size 256 .* write x\.flatten\(1\)"),
])
def test_unsupported_ops_are_named_and_their_channels_kept(case, where):
    torch.manual_seed(0)
    model = Unprunable(case).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UnprunableLayerWarning, match=where) as record:
        graph = analyze_channels(model, x)
    messages = [str(w.message) for w in record if issubclass(w.category, UnprunableLayerWarning)]
    assert any("conv keeps its width" in m for m in messages), messages
    assert any("'other'" in m or "aten.sum" in m for m in messages)  # the channel sum is named too
    names = [g.name for g in graph.groups()]
    assert "conv" not in names and "other" not in names


def test_a_model_torch_export_cannot_trace_raises_export_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[: int(x.sum() > 0) + 1]

    with pytest.raises(ExportError, match="DataDependent"):
        analyze_channels(DataDependent(), torch.randn(2, 3))
