"""A small MobileNetV2-style CNN for ``[N, 1, 28, 28]`` images (``mobile-cnn`` in the zoo).

Stem conv 3x3/2 + BN + ReLU6, then inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1
project, each with BN; ReLU6 after expand and depthwise, none after project as in MobileNetV2):

    stem      1 -> 16, 14x14
    block1    16 -> 16 (expand 64), residual add
    block2    16 -> 32 (expand 96), stride 2 -> 7x7
    block3    32 -> 32 (expand 128), residual add
    block4    concat [x, branch(x)]: 32 -> 32 + 32 (branch: expand 128, project 32)
    block5    64 -> 64 (expand 192), residual add
    head      1x1 64 -> 256, BN, ReLU6; global average pool; Linear 256 -> 10

About 75.5 k parameters and 4.0 M MACs per image with the defaults. Every width is a
constructor argument, so a structurally pruned copy can be rebuilt from ``structured_widths()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project (linear bottleneck); adds the input when shapes allow."""

    def __init__(self, c_in: int, expand: int, c_out: int, stride: int = 1, *, residual: bool = True) -> None:
        super().__init__()
        self.expand = conv_bn(c_in, expand, 1)
        self.depthwise = conv_bn(expand, expand, 3, stride=stride, groups=expand)
        self.project = conv_bn(expand, c_out, 1, act=False)
        self.residual = residual and stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class ConcatBlock(nn.Module):
    """DenseNet-style growth: ``cat([x, branch(x)], dim=1)``."""

    def __init__(self, c_in: int, expand: int, growth: int) -> None:
        super().__init__()
        self.branch = InvertedResidual(c_in, expand, growth, residual=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.branch(x)], dim=1)


class MobileNetTiny(nn.Module):
    def __init__(
        self,
        stem: int = 16,
        expand: tuple[int, ...] = (64, 96, 128, 128, 192),
        mid: int = 32,
        branch: int = 32,
        head: int = 256,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(expand) != 5:
            raise ValueError(f"MobileNetTiny: expand needs 5 widths (one per block), got {len(expand)}")
        e1, e2, e3, e4, e5 = expand
        wide = mid + branch
        self.stem = conv_bn(1, stem, 3, stride=2)
        self.block1 = InvertedResidual(stem, e1, stem)
        self.block2 = InvertedResidual(stem, e2, mid, stride=2)
        self.block3 = InvertedResidual(mid, e3, mid)
        self.block4 = ConcatBlock(mid, e4, branch)
        self.block5 = InvertedResidual(wide, e5, wide)
        self.head = conv_bn(wide, head, 1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block5(self.block4(self.block3(self.block2(self.block1(x)))))
        x = F.adaptive_avg_pool2d(self.head(x), 1)
        return self.classifier(x.flatten(1))

    def structured_widths(self) -> dict:
        """Constructor arguments that rebuild this skeleton at its current (possibly pruned) widths."""
        blocks = (self.block1, self.block2, self.block3, self.block4.branch, self.block5)
        return {
            "stem": self.stem[0].out_channels,
            "expand": [b.expand[0].out_channels for b in blocks],
            "mid": self.block2.project[0].out_channels,
            "branch": self.block4.branch.project[0].out_channels,
            "head": self.head[0].out_channels,
            "num_classes": self.classifier.out_features,
        }


def mobile_cnn(**kw) -> nn.Module:
    """Zoo constructor for ``mobile-cnn``; ``expand`` may come from YAML/JSON as a list."""
    if "expand" in kw:
        kw["expand"] = tuple(kw["expand"])
    return MobileNetTiny(**kw)
