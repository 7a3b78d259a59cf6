"""Numbers for codebook quantization: equal counts, k-means error, exact powers of two, centroid grads."""
from __future__ import annotations

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.ops.nonuniform import (
    centroid_gradients,
    decode,
    equal_population_codebook,
    kmeans_codebook,
    power_of_two_codebook,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mse(w, codebook, indices, mask=None):
    return ((decode(codebook, indices, mask=mask) - w) ** 2).mean().item()


# ---------------------------------------------------------------- equal population


@pytest.mark.parametrize("n,bits", [(1000, 3), (1003, 4), (37, 5)])
def test_equal_population_counts_differ_by_at_most_one(n, bits):
    w = torch.randn(n, generator=_gen(n))
    codebook, idx = equal_population_codebook(w, bits)
    counts = torch.bincount(idx.long(), minlength=2 ** bits)
    assert idx.dtype is torch.uint8 and idx.shape == w.shape and codebook.numel() == 2 ** bits
    assert counts.max() - counts.min() <= 1 and counts.sum() == n


def test_equal_population_exact_counts_with_many_ties():
    w = torch.cat([torch.zeros(700), torch.randn(300, generator=_gen(1))]).reshape(10, 100)
    codebook, idx = equal_population_codebook(w, 2)
    assert torch.bincount(idx.flatten().long(), minlength=4).tolist() == [250, 250, 250, 250]
    # each level is the mean of its members, and levels are sorted
    for j in range(4):
        assert codebook[j].item() == pytest.approx(w[idx == j].mean().item(), abs=1e-7)
    assert torch.all(codebook[1:] >= codebook[:-1])


def test_equal_population_bins_are_rank_quantiles():
    w = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    codebook, idx = equal_population_codebook(w, 1)
    assert idx.tolist() == [1, 0, 1, 0, 1, 0]
    assert codebook.tolist() == [1.0, 4.0]


def test_equal_population_with_fewer_weights_than_levels():
    codebook, idx = equal_population_codebook(torch.tensor([3.0, -1.0, 2.0]), 2)
    assert codebook.tolist() == [-1.0, 2.0, 3.0] and idx.tolist() == [2, 0, 1]


def test_mask_excludes_pruned_weights_from_fit_and_decode_restores_zeros():
    w = torch.randn(20, 30, generator=_gen(2))
    mask = torch.rand(20, 30, generator=_gen(3)) > 0.8  # ~80 % pruned
    w_pruned = w * mask
    for fit in (equal_population_codebook, kmeans_codebook, power_of_two_codebook):
        codebook, idx = fit(w_pruned, 3, mask=mask)
        assert torch.all(idx[~mask] == 0)
        restored = decode(codebook, idx, mask=mask)
        assert torch.all(restored[~mask] == 0)
        # masked fit equals fitting the surviving values alone
        codebook_1d, idx_1d = fit(w[mask], 3)
        assert torch.equal(codebook, codebook_1d) and torch.equal(idx[mask], idx_1d)
    counts = torch.bincount(equal_population_codebook(w_pruned, 3, mask=mask)[1][mask].long(), minlength=8)
    assert counts.max() - counts.min() <= 1


# ---------------------------------------------------------------- k-means


def test_kmeans_reduces_error_versus_linear_init_and_is_deterministic():
    w = torch.randn(64, 64, generator=_gen(4)) * 0.05
    init_cb, init_idx = kmeans_codebook(w, 3, iters=0)
    assert torch.allclose(init_cb.double(), torch.linspace(w.min().item(), w.max().item(), 8, dtype=torch.float64))
    codebook, idx = kmeans_codebook(w, 3)
    assert _mse(w, codebook, idx) < 0.6 * _mse(w, init_cb, init_idx)
    codebook2, idx2 = kmeans_codebook(w.clone(), 3)
    assert torch.equal(codebook, codebook2) and torch.equal(idx, idx2)
    assert codebook.numel() == 8 and torch.all(codebook[1:] > codebook[:-1])


def test_kmeans_converges_to_a_lloyd_fixed_point():
    w = torch.randn(20000, generator=_gen(5))
    codebook, idx = kmeans_codebook(w, 2, iters=500)
    for j in range(4):
        assert codebook[j].item() == pytest.approx(w[idx == j].mean().item(), abs=1e-5)
    # nearest-level assignment
    nearest = (w.unsqueeze(1) - codebook.unsqueeze(0)).abs().argmin(dim=1)
    assert torch.equal(idx.long(), nearest)
    # the optimal 4-level quantizer of a Gaussian leaves 0.1175 of its variance (Max 1960)
    assert _mse(w, codebook, idx) / w.var(unbiased=False).item() == pytest.approx(0.1175, abs=0.003)


def test_kmeans_reseeds_empty_clusters():
    w = torch.cat([torch.randn(500, generator=_gen(6)), torch.tensor([100.0])])
    init_cb, init_idx = kmeans_codebook(w, 2, iters=0)
    assert torch.bincount(init_idx.long(), minlength=4).tolist()[1:3] == [0, 0]  # levels at ~32, ~66 unused
    codebook, idx = kmeans_codebook(w, 2)
    assert torch.all(torch.bincount(idx.long(), minlength=4) > 0)
    assert codebook[-1].item() == 100.0
    assert _mse(w, codebook, idx) < 0.1 * _mse(w, init_cb, init_idx)


def test_kmeans_with_few_distinct_values_is_exact():
    w = torch.tensor([[2.0, 1.0], [2.0, 3.0], [1.0, 1.0]])
    codebook, idx = kmeans_codebook(w, 2)
    assert codebook.tolist() == [1.0, 2.0, 3.0] and torch.equal(decode(codebook, idx), w)


def test_kmeans_density_init_is_no_worse_than_equal_population():
    w = torch.randn(3000, generator=_gen(7)) ** 3  # heavy-tailed
    ep_cb, ep_idx = equal_population_codebook(w, 3)
    codebook, idx = kmeans_codebook(w, 3, init="density")
    assert _mse(w, codebook, idx) < _mse(w, ep_cb, ep_idx)


# ---------------------------------------------------------------- power of two


def test_power_of_two_levels_are_exact_powers_of_two():
    w = torch.randn(50, 40, generator=_gen(8)) * 0.1
    codebook, idx = power_of_two_codebook(w, 4)
    assert codebook.numel() == 15 and torch.all(codebook[1:] > codebook[:-1])
    nonzero = codebook[codebook != 0]
    assert nonzero.numel() == 14
    mantissa, _ = torch.frexp(nonzero.abs())
    assert torch.all(mantissa == 0.5)  # 2^k exactly: mantissa 0.5, nothing else
    assert torch.equal(nonzero[7:], -nonzero[:7].flip(0))
    # nearest level in the linear domain
    best = (w.unsqueeze(-1) - codebook).abs().min(dim=-1).values
    assert torch.equal((decode(codebook, idx) - w).abs(), best)


def test_power_of_two_hand_computed():
    w = torch.tensor([1.0, 0.3, 0.2, 0.05, -0.6, 0.0, -0.8])
    codebook, idx = power_of_two_codebook(w, 3)
    assert codebook.tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert decode(codebook, idx).tolist() == [1.0, 0.25, 0.25, 0.0, -0.5, 0.0, -1.0]
    # top exponent is the power of two nearest to max|w|: 0.7 -> 0.5, 0.8 -> 1.0
    assert power_of_two_codebook(torch.tensor([0.7, -0.1]), 2)[0].tolist() == [-0.5, 0.0, 0.5]
    assert power_of_two_codebook(torch.tensor([0.8, -0.1]), 2)[0].tolist() == [-1.0, 0.0, 1.0]


def test_power_of_two_all_zero():
    codebook, idx = power_of_two_codebook(torch.zeros(3, 3), 4)
    assert codebook.tolist() == [0.0] and torch.equal(decode(codebook, idx), torch.zeros(3, 3))


# ---------------------------------------------------------------- centroid gradients and decode


def test_centroid_gradients_hand_computed():
    idx = torch.tensor([[0, 1], [1, 2]], dtype=torch.uint8)
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert centroid_gradients(grad, idx, 4).tolist() == [1.0, 5.0, 4.0, 0.0]
    mask = torch.tensor([[True, False], [True, True]])
    assert centroid_gradients(grad, idx, 3, mask=mask).tolist() == [1.0, 3.0, 4.0]


def test_centroid_gradients_match_autograd():
    w = torch.randn(30, 20, generator=_gen(9))
    codebook, idx = kmeans_codebook(w, 4)
    upstream = torch.randn(30, 20, generator=_gen(10))
    cb = codebook.clone().requires_grad_()
    (cb[idx.long()] * upstream).sum().backward()
    assert torch.allclose(centroid_gradients(upstream, idx, cb.numel()), cb.grad, atol=1e-5)


def test_bad_inputs_are_config_errors():
    w = torch.randn(10)
    with pytest.raises(ConfigError, match=r"^bits: 9 is outside 1\.\.8"):
        kmeans_codebook(w, 9)
    with pytest.raises(ConfigError, match=r"^bits: 1 is outside 2\.\.8"):
        power_of_two_codebook(w, 1)
    with pytest.raises(ConfigError, match=r"init: 'forgy' is not allowed"):
        kmeans_codebook(w, 2, init="forgy")
    with pytest.raises(ConfigError, match=r"indices: range 0\.\.3 does not fit a codebook of 2 levels"):
        decode(torch.tensor([0.0, 1.0]), torch.tensor([0, 3], dtype=torch.uint8))
    with pytest.raises(ConfigError, match=r"mask: torch.float32 of shape \[10\] must be torch.bool"):
        equal_population_codebook(w, 2, mask=torch.ones(10))
    with pytest.raises(ConfigError, match=r"grad_w: shape \[10\] differs from indices shape \[5\]"):
        centroid_gradients(w, torch.zeros(5, dtype=torch.uint8), 4)
