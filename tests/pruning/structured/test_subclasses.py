"""Conv and Linear subclasses (TF-style "same" padding, a custom init) pruned as their base class."""
import torch
import torch.nn.functional as F
from torch import nn

import deepshrink as ds
from deepshrink.pruning.structured.configs import ChannelPruning


class SameConv(nn.Conv2d):
    """TensorFlow's "same" padding, computed from the input in forward (as ported mobile nets do)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Head(nn.Linear):
    def __init__(self, features: int, classes: int, scale: float) -> None:   # not Linear's signature
        super().__init__(features, classes)
        self.scale = scale


class Scaled(nn.Conv2d):
    """Holds a tensor of its own, one per output channel: not pruned as a plain conv."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1))

    def forward(self, x):
        return super().forward(x) * self.gain


class Net(nn.Module):
    def __init__(self, conv=SameConv) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = conv(1, 16, 3, stride=2), SameConv(16, 32, 3, stride=2)
        self.fc = Head(32 * 7 * 7, 10, scale=0.5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1)) * self.fc.scale


def test_subclasses_are_pruned_as_their_base_and_stay_themselves():
    model, x = Net().eval(), torch.randn(2, 1, 28, 28)
    report = ds.prune_report(ds.prune(model, ChannelPruning(ratio=0.5), example_input=x))
    assert report.unpruned == []
    assert report.layers == {"c1": (16, 8), "c2": (32, 16), "fc": (10, 10)}
    # 16*9*14*14 + 32*16*9*7*7 + 1568*10 before; halved channels after
    assert (report.macs_before, report.macs_after) == (269696, 8 * 9 * 196 + 16 * 8 * 9 * 49 + 784 * 10)
    assert type(model.c1) is SameConv and type(model.fc) is Head and model.fc.scale == 0.5
    assert model.c2.in_channels == 8 and model.c2.out_channels == 16 and model.fc.in_features == 784
    assert model(x).shape == (2, 10)


def test_a_subclass_with_tensors_of_its_own_is_left_and_named():
    model, x = Net(conv=Scaled).eval(), torch.randn(2, 1, 28, 28)
    report = ds.prune_report(ds.prune(model, ChannelPruning(ratio=0.5), example_input=x))
    assert any("Scaled subclasses Conv2d but holds gain of its own" in line for line in report.unpruned)
    assert model.c1.out_channels == 16 and model(x).shape == (2, 10)
