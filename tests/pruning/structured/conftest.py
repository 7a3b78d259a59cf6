"""Small constructed models, one per kind of channel coupling, and the masked-vs-shrunk check."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.pruning.structured import ChannelPlan, analyze_channels, local_counts, magnitude_scores, mask_channels, shrink_channels, top_channels


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines, so a BN that is not sliced correctly shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


def masked_and_shrunk(model: nn.Module, x: torch.Tensor, *, ratio: float = 0.5, multiple: int = 1):
    """(masked model, shrunk model, graph, groups): local L1 pruning at ``ratio`` applied both ways."""
    graph = analyze_channels(model, x)
    groups = graph.groups()
    scores = magnitude_scores(model, graph, groups)
    counts = local_counts([g.size for g in groups], [ratio] * len(groups), multiple)
    plan = ChannelPlan.from_keep(graph, groups, [top_channels(s, k) for s, k in zip(scores, counts)])
    masked, shrunk = copy.deepcopy(model), copy.deepcopy(model)
    mask_channels(masked, plan)
    shrink_channels(shrunk, plan)
    return masked.eval(), shrunk.eval(), graph, groups


class ConvConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 12, 3)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class ConvBnConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.conv2(F.relu6(self.bn(self.conv1(x))))


class Residual(nn.Module):
    """stem -> (+ a) -> (+ b): stem, a and b share one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = x + self.b(x)
        return self.head(x)


class Concat(nn.Module):
    """cat([p, q]) then + r: r's first 8 channels pair with p, its last 16 with q."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 8, 1)
        self.q = nn.Conv2d(3, 16, 1)
        self.r = nn.Conv2d(3, 24, 1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.p(x), self.q(x)], dim=1) + self.r(x)))


class Depthwise(nn.Module):
    """1x1 expand -> 3x3 depthwise (BN, ReLU6) -> depthwise with multiplier 2 -> 1x1 project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.project = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.project(self.dw2(F.relu6(self.bn(self.dw(self.expand(x))))))


class FlattenLinear(nn.Module):
    """conv 8 channels on 6x6 -> 4x4 -> flatten: each channel is 16 input features of fc."""

    def __init__(self, use_view: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 12)
        self.out = nn.Linear(12, 3)
        self.use_view = use_view

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x.view(x.size(0), -1) if self.use_view else x.flatten(1)
        return self.out(torch.relu(self.fc(x)))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean(x))))): the broadcast mul couples conv with fc2's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return self.head(x * gate.unsqueeze(-1).unsqueeze(-1))
