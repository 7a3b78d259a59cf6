"""Small constructed models and data for the quantization tests (no training, no downloads)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepshrink.data import from_datasets


class TinyMobile(nn.Module):
    """MobileNet-style block stack: conv-BN-ReLU6, explicit zero pad + depthwise-BN-ReLU6,
    pointwise-BN-ReLU, global pool, linear. Batch norm statistics are randomised so folding matters."""

    def __init__(self, act=nn.ReLU6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), act())
        self.dw = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8), act())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make_mobile(act=nn.ReLU6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyMobile(act)
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                # channel scales spread over two orders of magnitude, as after training a depthwise layer
                m.weight.copy_(torch.logspace(-1, 1, m.num_features)[torch.randperm(m.num_features)])
                m.bias.uniform_(-1, 1)
    return model.eval()


def labelled_by(model: nn.Module, n: int = 384, shape=(1, 16, 16), seed: int = 0):
    """Random inputs labelled by ``model``'s own argmax: the float model scores 100 %."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return from_datasets(TensorDataset(x[: n // 2], y[: n // 2]), TensorDataset(x[n // 2:], y[n // 2:]),
                         val=TensorDataset(x[n // 2:], y[n // 2:]), num_classes=10, calib_size=128)


@pytest.fixture(scope="module")
def mobile():
    return make_mobile()


@pytest.fixture(scope="module")
def mobile_data(mobile):
    return labelled_by(mobile)
