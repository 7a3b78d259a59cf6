"""Sparse variational dropout: the KL approximation's numbers, that training learns to drop the
weights that carry no information, a clean model afterwards, and the config's guard rails."""
from __future__ import annotations

import math

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import get_masks
from deepshrink.data.splits import from_tensors
from deepshrink.models.zoo import MLP
from deepshrink.pipeline.recipe import parse_prune
from deepshrink.pruning import (
    Gradual, MagnitudePruning, VariationalDropout, finalize, kl_to_log_uniform, log_alpha, prune, prune_report,
    prune_with_schedule, variational_scores,
)
from deepshrink.pruning.variational import LOG_SIGMA2
from deepshrink.training import TrainConfig, accuracy, fit


def _informative_first_two(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes told apart by inputs 0-1 only; inputs 2-7 are pure noise."""
    centers = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]])
    y = torch.arange(n) % 4
    x = torch.randn(n, 8, generator=g)
    x[:, :2] = centers[y] + 0.4 * x[:, :2]
    return x, y


@pytest.fixture(scope="module")
def noisy_inputs():
    g = torch.Generator().manual_seed(0)
    return from_tensors("noisy", _informative_first_two(600, g), _informative_first_two(200, g),
                        num_classes=4, val_fraction=0.2, calib_size=32, seed=0)


def _trained(data) -> MLP:
    torch.manual_seed(0)
    model = MLP(hidden=(16,), in_features=8, num_classes=4)
    fit(model, data, TrainConfig(epochs=10, lr=1e-2, batch_size=32), progress=False)
    return model


VD = VariationalDropout(train=TrainConfig(epochs=30, lr=1e-2, batch_size=32), skip_classifier=False)


def test_kl_approximation_matches_the_papers_formula():
    # -KL = k1 sigmoid(k2 + k3 log a) - 0.5 log(1 + 1/a) - k1, with k1..k3 of Molchanov et al. eq. 14
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    for la in (-5.0, 0.0, 2.0):
        expected = -(k1 / (1 + math.exp(-(k2 + k3 * la))) - 0.5 * math.log1p(math.exp(-la)) - k1)
        assert float(kl_to_log_uniform(torch.tensor([la]))) == pytest.approx(expected, rel=1e-6)
    assert float(kl_to_log_uniform(torch.tensor([0.0]))) == pytest.approx(0.43125, abs=1e-4)
    values = kl_to_log_uniform(torch.linspace(-8, 8, 50))  # summed over weights
    per_point = torch.stack([kl_to_log_uniform(torch.tensor([v])) for v in torch.linspace(-8, 8, 50)])
    assert torch.all(per_point[1:] < per_point[:-1])  # more noise, closer to the prior
    assert float(per_point[-1]) < 1e-3 and float(values) == pytest.approx(float(per_point.sum()), rel=1e-5)


def test_log_alpha_is_log_variance_over_squared_weight_clipped():
    w = torch.tensor([0.5, -2.0, 0.0, 1e-6])
    ls2 = torch.tensor([math.log(0.25), math.log(4.0) + 1.0, -3.0, 30.0])
    assert log_alpha(w, ls2).tolist() == pytest.approx([0.0, 1.0, 10.0, 10.0], abs=1e-5)


def test_learns_to_drop_the_weights_of_noise_inputs(noisy_inputs):
    model = _trained(noisy_inputs)
    dense_acc = accuracy(model, noisy_inputs.loader("test"))
    report = prune_report(prune(model, VD, data=noisy_inputs, train_fn=fit))
    mask = get_masks(model)["hidden.0.weight"]
    kept_informative = mask[:, :2].float().mean().item()
    kept_noise = mask[:, 2:].float().mean().item()
    assert report.sparsity > 0.6
    assert kept_noise < 0.1 and kept_informative > 3 * kept_noise
    assert accuracy(model, noisy_inputs.loader("test")) >= dense_acc - 0.02
    assert dense_acc > 0.9


def test_leaves_the_model_as_it_found_it_but_for_weights(noisy_inputs):
    model = _trained(noisy_inputs)
    keys = list(model.state_dict())
    prune(model, VariationalDropout(train=TrainConfig(epochs=1, lr=1e-2, batch_size=64)), data=noisy_inputs, train_fn=fit)
    assert list(finalize(model).state_dict()) == keys   # the masks were all it added
    assert not any(hasattr(m, LOG_SIGMA2) or m._forward_hooks for m in model.modules())
    assert not model.training


def test_a_number_ranks_by_log_alpha_and_hits_it_exactly(noisy_inputs):
    config = VariationalDropout(sparsity=0.5, train=TrainConfig(epochs=2, lr=1e-2, batch_size=64), skip_classifier=False)
    reference = _trained(noisy_inputs)  # the same training (seeded) gives the scores prune ranks by
    weights = {n: p for n, p in reference.named_parameters() if n.endswith("weight")}
    scores = torch.cat([s.reshape(-1) for s in variational_scores(reference, weights, config, noisy_inputs, train_fn=fit).values()])
    model = _trained(noisy_inputs)
    report = prune_report(prune(model, config, data=noisy_inputs, train_fn=fit))
    assert sum(t - k for k, t in report.layers.values()) == round(0.5 * (16 * 8 + 4 * 16)) == 96
    kept = torch.cat([m.reshape(-1) for m in get_masks(model).values()])
    assert scores[~kept].max() <= scores[kept].min()  # the lowest scores (highest log alpha) went
    assert torch.equal(kept, scores > scores.sort().values[95])


def test_learned_sparsity_is_only_for_criteria_that_learn_it():
    with pytest.raises(ConfigError, match="sparsity: is required for MagnitudePruning"):
        MagnitudePruning(sparsity=None)
    with pytest.raises(ConfigError, match="overrides, groups and patterns need a sparsity"):
        VariationalDropout(overrides={"hidden.0": 0.5})
    with pytest.raises(ConfigError, match="kl_weight"):
        VariationalDropout(kl_weight=0.0)


def test_needs_data_and_no_schedule(noisy_inputs):
    model = _trained(noisy_inputs)
    with pytest.raises(ConfigError, match="learns its scores by training: pass data"):
        prune(model, VD)
    with pytest.raises(ConfigError, match="learns its own during its training"):
        prune_with_schedule(model, VD, Gradual(steps=2), data=noisy_inputs, train_config=TrainConfig(epochs=2))


def test_recipe_method_variational():
    stage = parse_prune({"method": "variational", "train": {"epochs": 3, "lr": 0.001}, "kl_weight": 0.5,
                         "retrain": {"epochs": 2}}, "stages[1].prune")
    assert stage.pruning == VariationalDropout(train=TrainConfig(epochs=3, lr=0.001), kl_weight=0.5)
    assert stage.pruning.sparsity is None
    with pytest.raises(ConfigError, match=r"stages\[1\].prune.sensitivity: needs a sparsity"):
        parse_prune({"method": "variational", "sensitivity": {}}, "stages[1].prune")
