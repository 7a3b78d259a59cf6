"""Criteria rank weights as their definitions say, on cases whose scores are computed by hand."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import get_masks
from deepshrink.data.splits import from_tensors
from deepshrink.ops.masks import local_mask
from deepshrink.pruning import (
    GradientPruning,
    MagnitudePruning,
    PruningConfig,
    RandomPruning,
    TaylorPruning,
    prune,
    register_criterion,
)
from deepshrink.pruning.importance import gradient_scores, magnitude_scores, taylor_scores


def _linear(weight: list[list[float]]) -> nn.Sequential:
    layer = nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return nn.Sequential(layer)


def _sum_loss(out: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return (out * coef).sum()  # dL/dW = coef^T x: gradients chosen by hand


def test_gradient_taylor_and_magnitude_keep_different_weights():
    # w = (10, 0.5, 0.01), dL/dw = x = (0.01, 1, 2): |w| keeps w0, |g| keeps w2, |w g| = (0.1, 0.5, 0.02) keeps w1
    model = _linear([[10.0, 0.5, 0.01]])
    weights = {"0.weight": model[0].weight}
    batches = [(torch.tensor([[0.01, 1.0, 2.0]]), torch.tensor([[1.0]]))]
    grad = gradient_scores(model, weights, batches, loss_fn=_sum_loss)
    taylor = taylor_scores(model, weights, batches, loss_fn=_sum_loss)
    assert grad["0.weight"][0].tolist() == pytest.approx([0.01, 1.0, 2.0])
    assert taylor["0.weight"][0].tolist() == pytest.approx([0.1, 0.5, 0.02])
    keep_one = {name: local_mask(s, 2 / 3)["0.weight"].tolist() for name, s in
                {"magnitude": magnitude_scores(weights), "gradient": grad, "taylor": taylor}.items()}
    assert keep_one == {"magnitude": [[True, False, False]], "gradient": [[False, False, True]], "taylor": [[False, True, False]]}


@pytest.mark.parametrize("norm, kept_row", [("l1", 1), ("l2", 0)])
def test_magnitude_norm_decides_which_block_stays(norm, kept_row):
    # one 1x4 block per row: sum |w| = 3 vs 4 keeps row 1; sum w^2 = 9 vs 4 keeps row 0
    model = _linear([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    prune(model, MagnitudePruning(sparsity=0.5, pattern="1x4", norm=norm, layers=("0",)))
    assert get_masks(model)["0.weight"].all(dim=1).tolist() == [kept_row == 0, kept_row == 1]


def test_absolute_value_is_taken_per_batch_before_averaging():
    model = _linear([[1.0, 1.0]])
    batches = [(torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0]])), (torch.tensor([[3.0, 1.0]]), torch.tensor([[-1.0]]))]
    grad = gradient_scores(model, {"w": model[0].weight}, batches, loss_fn=_sum_loss)
    assert grad["w"].tolist() == [[3.0, 1.0]]  # the signed mean would be 0 for both


def test_gradient_scores_match_hand_computed_cross_entropy_gradients_and_leave_grad_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    w = model[0].weight
    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 2, 1])), (torch.randn(4, 5), torch.tensor([2, 2, 0, 1]))]
    expected = []
    for x, y in batches:  # d mean-CE / dW = (softmax(x W^T) - onehot(y))^T x / B
        p = torch.softmax(x @ w.detach().T, 1) - F.one_hot(y, 3)
        expected.append((p.T @ x / len(y)).abs())
    grad = gradient_scores(model, {"w": w}, batches)["w"]
    assert torch.allclose(grad, (expected[0] + expected[1]) / 2, atol=1e-6)
    assert torch.allclose(taylor_scores(model, {"w": w}, batches)["w"], w.detach().abs() * grad, atol=1e-6)
    assert w.grad is None


def test_big_weight_with_zero_gradient_ranks_lowest_under_gradient_pruning():
    # input feature 2 is always 0, so column 2 gets no gradient however large it is
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    x[:, 2] = 0.0
    y = (x[:, 0] > 0).long()
    data = from_tensors("toy", (x, y), (x[:8], y[:8]), num_classes=2, val_fraction=0.25, calib_size=8, seed=0)
    torch.manual_seed(0)
    model, magnitude = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)) for _ in range(2))
    with torch.no_grad():
        model[0].weight[:, 2] = 100.0
    magnitude.load_state_dict(model.state_dict())
    config = dict(sparsity=0.25, scope="local", layers=("0",))
    prune(model, GradientPruning(batches=2, batch_size=16, **config), data=data)
    assert get_masks(model)["0.weight"][:, 2].tolist() == [False] * 6  # exactly the 6 pruned: round(0.25 * 24)
    prune(magnitude, MagnitudePruning(**config))
    assert get_masks(magnitude)["0.weight"][:, 2].tolist() == [True] * 6


@pytest.mark.parametrize("config", [GradientPruning(), TaylorPruning(batches=8)])
def test_data_driven_criteria_without_data_say_how_to_fix_it(config):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=rf"^{type(config).__name__}: needs data to score weights .* call prune\(model, config, data=splits\)"):
        prune(model, config)


def test_random_pruning_is_seeded_and_exact():
    def masks(seed):
        model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
        prune(model, RandomPruning(sparsity=0.3, seed=seed))
        return get_masks(model)["0.weight"]

    assert torch.equal(masks(0), masks(0))
    assert not torch.equal(masks(0), masks(1))
    assert int((~masks(3)).sum()) == 30


@dataclass(frozen=True)
class _KeepNegative(PruningConfig):
    pass


@register_criterion(_KeepNegative)
def _keep_negative(model, weights, config, data):
    return {n: -w.detach() for n, w in weights.items()}


def test_a_user_criterion_is_one_config_and_one_handler():
    model = _linear([[3.0, -2.0, 1.0, -4.0]])
    prune(model, _KeepNegative(sparsity=0.5, layers=("0",)))
    assert model[0].weight.tolist() == [[0.0, -2.0, 0.0, -4.0]]
