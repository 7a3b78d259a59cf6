"""MAC and parameter counts checked against numbers worked out by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.counting import count_macs, parameter_counts


class FunctionalLinear(nn.Module):
    """A model with no nn.Linear: layer hooks see nothing, the framework sees the matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 20))
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


def test_functional_linear_counts():
    model = FunctionalLinear()
    assert count_macs(model, torch.randn(4, 20)) == 20 * 10          # one sample, whatever the batch
    assert count_macs(model, torch.randn(4, 7, 20)) == 7 * 20 * 10    # every position of a sequence
    assert parameter_counts(model) == (210, 200)                     # the zero bias is not a non-zero


def test_a_layer_named_upscale_counts_all_its_parameters():
    model = nn.Sequential()
    model.add_module("upscale", nn.Linear(16, 16))
    model.add_module("zero_point_head", nn.Linear(16, 4))
    assert parameter_counts(model)[0] == 16 * 16 + 16 + 16 * 4 + 4 == 340
    assert count_macs(model, torch.randn(1, 16)) == 16 * 16 + 16 * 4


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)         # 3x16x16 -> 8x8x8
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise, 8x8x8
        self.pw = nn.Conv2d(8, 12, 1)                                # 12x8x8
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.max_pool2d(self.pw(self.dw(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_conv_net_against_hand_count():
    macs = (8 * 8 * 8) * (3 * 3 * 3) + (8 * 8 * 8) * (3 * 3 * 1) + (12 * 8 * 8) * 8 + 12 * 4 * 4 * 5
    assert macs == 13_824 + 4_608 + 6_144 + 960
    model = ConvNet()
    assert count_macs(model, torch.randn(2, 3, 16, 16)) == macs
    weights = (8 * 27 + 8) + (8 + 8) + 8 * 9 + (12 * 8 + 12) + (192 * 5 + 5)   # conv, BN affine, dw, pw, fc
    # running mean/var are activation statistics and num_batches_tracked is bookkeeping: not weights
    assert parameter_counts(model)[0] == weights == 1_385


def test_counting_leaves_batch_norm_statistics_alone():
    model = ConvNet().train()
    before = model.bn.running_mean.clone()
    count_macs(model, torch.randn(1, 3, 16, 16) + 5)
    assert torch.equal(model.bn.running_mean, before) and model.bn.num_batches_tracked == 0
    assert model.training


class Attention(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):                                   # [B, T, D], one head
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v)          # CPU's fused kernel
        scores = torch.bmm(x, x.transpose(1, 2))             # a second, explicit batched matmul
        return a.squeeze(1) + torch.bmm(scores, x)


def test_attention_and_bmm():
    t, d = 6, 16
    projection = t * d * 3 * d
    sdpa = t * t * d + t * t * d                              # Q K^T, then weights @ V
    bmm = t * t * d + t * t * d
    assert count_macs(Attention(d), torch.randn(3, t, d)) == projection + sdpa + bmm


def test_lstm_counts_every_step():
    t, i, h = 5, 12, 32
    lstm = nn.LSTM(i, h, num_layers=2, batch_first=True)
    per_step = 4 * h * (i + h) + 4 * h * (h + h)             # W_ih x + W_hh h for each of the 4 gates, 2 layers
    assert count_macs(lstm, torch.randn(1, t, i)) == t * per_step


def test_sparse_counts_nonzeros():
    from deepshrink.formats.sparse_compute import CsrLinear

    torch.manual_seed(0)
    weight = torch.randn(30, 40)
    weight[torch.rand_like(weight) < 0.9] = 0
    nnz = int(torch.count_nonzero(weight))
    dense = nn.Linear(40, 30)
    with torch.no_grad():
        dense.weight.copy_(weight)
    assert parameter_counts(dense) == (1230, nnz + 30)
    assert count_macs(dense, torch.randn(1, 40)) == 1200                       # zeros are still multiplied
    sparse = CsrLinear(weight, dense.bias)
    assert parameter_counts(sparse) == (nnz + 30, nnz + 30)                    # values and bias; indices are not weights
    assert count_macs(sparse, torch.randn(1, 40)) == nnz                       # a CSR kernel multiplies its non-zeros


def test_non_persistent_buffers_and_shared_weights_count_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.out = nn.Linear(8, 50, bias=False)
            self.out.weight = self.emb.weight
            self.register_buffer("causal", torch.ones(64, 64), persistent=False)   # a cache, not state

        def forward(self, ids):
            return self.out(self.emb(ids))

    model = Tied()
    assert parameter_counts(model)[0] == 400
    assert count_macs(model, torch.zeros(1, 3, dtype=torch.long)) == 3 * 8 * 50


def test_exported_program_counts_like_its_module():
    model = ConvNet().eval()
    x = torch.randn(1, 3, 16, 16)
    program = torch.export.export(model, (x,))
    assert count_macs(program, x) == count_macs(model, x)
    assert parameter_counts(program) == parameter_counts(model)


@pytest.mark.parametrize("dims", [(1, 8), (2, 3, 8)])
def test_matmul_of_activations(dims):
    class Gram(nn.Module):
        def forward(self, x):
            return x @ x.transpose(-1, -2)

    rows = 1 if len(dims) == 2 else dims[1]
    assert count_macs(Gram(), torch.randn(*dims)) == rows * rows * 8
