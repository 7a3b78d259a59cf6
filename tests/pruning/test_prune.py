"""``prune``: scopes, groups and overrides hit their sparsities exactly; patterns reach the model;
masks compose and survive fine-tuning; bad layer names fail loudly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import get_masks
from deepshrink.models.zoo import MLP
from deepshrink.ops.masks import input_last
from deepshrink.pruning import MagnitudePruning, finalize, prune, prune_report
from deepshrink.training import TrainConfig, fit


def _mlp(hidden=(16, 16, 16)) -> MLP:
    torch.manual_seed(0)
    return MLP(hidden=hidden, in_features=8, num_classes=4)  # hidden.0 [16, 8], hidden.1/2 [16, 16]


def _zeros(model: nn.Module, layer: str) -> int:
    return int((dict(model.named_modules())[layer].weight == 0).sum())


def test_global_scope_prunes_round_s_total_with_one_threshold():
    model = _mlp()
    report = prune_report(prune(model, MagnitudePruning(sparsity=0.7, scope="global")))
    assert list(report.layers) == ["hidden.0", "hidden.1", "hidden.2"]  # classifier left dense
    total = 128 + 256 + 256
    assert sum(t - k for k, t in report.layers.values()) == round(0.7 * total) == 448
    weights = [dict(model.named_modules())[n].weight.detach() for n in report.layers]
    masks = [get_masks(model)[f"{n}.weight"] for n in report.layers]
    pruned = torch.cat([w[~m].abs() for w, m in zip(weights, masks)])
    kept = torch.cat([w[m].abs() for w, m in zip(weights, masks)])
    assert pruned.max() <= kept.min()
    assert _zeros(model, "classifier") == 0


def test_local_scope_prunes_every_layer_exactly():
    report = prune_report(prune(_mlp(), MagnitudePruning(sparsity=0.7, scope="local")))
    assert report.layers == {"hidden.0": (128 - 90, 128), "hidden.1": (256 - 179, 256), "hidden.2": (256 - 179, 256)}


def test_group_shares_one_threshold_and_the_rest_follow_scope():
    model = _mlp()
    report = prune_report(prune(model, MagnitudePruning(sparsity=0.5, scope="local", groups={"re:hidden\\.[12]": 0.75})))
    assert report.layers["hidden.0"] == (64, 128)
    group_pruned = sum(t - k for n, (k, t) in report.layers.items() if n != "hidden.0")
    assert group_pruned == round(0.75 * 512) == 384
    masks, layers = get_masks(model), dict(model.named_modules())
    pruned = torch.cat([layers[n].weight.detach()[~masks[f"{n}.weight"]].abs() for n in ("hidden.1", "hidden.2")])
    kept = torch.cat([layers[n].weight.detach()[masks[f"{n}.weight"]].abs() for n in ("hidden.1", "hidden.2")])
    assert pruned.max() <= kept.min()


def test_override_beats_group_beats_scope():
    report = prune_report(prune(_mlp(), MagnitudePruning(sparsity=0.1, groups={"re:hidden\\..*": 0.9}, overrides={"hidden.2": 0.25})))
    assert report.layers["hidden.2"] == (256 - 64, 256)
    assert sum(t - k for n, (k, t) in report.layers.items() if n != "hidden.2") == round(0.9 * 384) == 346


def test_explicit_layers_include_the_classifier():
    report = prune_report(prune(_mlp(), MagnitudePruning(sparsity=0.5, layers=("classifier",))))
    assert report.layers == {"classifier": (32, 64)}


@pytest.mark.parametrize("config, message", [
    (MagnitudePruning(layers=("fc9",)), r"^prune\.layers: 'fc9' matches no layer; layers are: hidden\.0, hidden\.1, hidden\.2, classifier$"),
    (MagnitudePruning(groups={"re:conv.*": 0.5}), r"^prune\.groups: 're:conv\.\*' matches no layer"),
    (MagnitudePruning(overrides={"classifier": 0.5}),
     r"^prune\.overrides: 'classifier' matches only layers that are not pruned \(classifier\); name them in `layers`"),
    (MagnitudePruning(pattern="1x3"), r"^pattern: block 1x3 does not fit 'hidden\.0' with weight shape \(16, 8\)"),
])
def test_bad_layer_choices_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        prune(_mlp(), config)


def test_nothing_left_to_prune_is_an_error():
    with pytest.raises(ConfigError, match=r"^prune\.layers: no layer left to prune among 0"):
        prune(nn.Sequential(nn.Linear(4, 2)), MagnitudePruning())


def test_block_and_nm_patterns_reach_the_model():
    model = _mlp()
    prune(model, MagnitudePruning(sparsity=0.5, pattern="4x4", scope="local"))
    tiles = input_last(get_masks(model)["hidden.1.weight"]).reshape(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16).sum(1)
    assert sorted(tiles.tolist()) == [0] * 8 + [16] * 8
    model = _mlp()
    prune(model, MagnitudePruning(sparsity=0.5, pattern="2:4"))
    for name in ("hidden.0", "hidden.1", "hidden.2"):
        w = dict(model.named_modules())[name].weight.detach()
        assert bool(((w != 0).reshape(-1, 4).sum(1) == 2).all()), name


def test_masks_compose_and_a_lower_sparsity_revives_nothing():
    model = _mlp()
    first = prune_report(prune(model, MagnitudePruning(sparsity=0.5, scope="local")))
    before = {n: m.clone() for n, m in get_masks(model).items()}
    second = prune_report(prune(model, MagnitudePruning(sparsity=0.8, scope="local")))
    assert second.layers["hidden.1"] == (256 - round(0.8 * 256), 256)
    for n, m in get_masks(model).items():
        assert not bool((m & ~before[n]).any()), n  # every weight pruned before is still pruned
    third = prune_report(prune(model, MagnitudePruning(sparsity=0.2, scope="local")))
    assert third.layers == second.layers and first.sparsity == 0.5


def test_pruned_weights_stay_exactly_zero_through_fine_tuning(blobs):
    model = MLP(hidden=(16, 16), in_features=8, num_classes=4)
    report = prune_report(prune(model, MagnitudePruning(sparsity=0.8)))
    masks = {n: m.clone() for n, m in get_masks(model).items()}
    live_before = {n: model.get_submodule(n[: -len(".weight")]).weight.detach().clone() for n in masks}
    config = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-3, batch_size=32)
    fit(model, blobs, config, progress=False)
    params = {n: model.get_submodule(n[: -len(".weight")]).weight for n in masks}   # as the model computes them
    for n, m in masks.items():
        assert bool((params[n][~m] == 0).all()), n
        assert not torch.equal(params[n][m], live_before[n][m]), n  # the kept weights did train
    assert sum(int((params[n] == 0).sum()) for n in masks) == round(0.8 * (128 + 256)) == 307
    assert report.sparsity == pytest.approx(307 / 384)
    finalize(model)
    params = dict(model.named_parameters())   # plain names again: no parametrization left
    assert not get_masks(model) and int((params["hidden.0.weight"] == 0).sum()) == 128 - report.layers["hidden.0"][0]
