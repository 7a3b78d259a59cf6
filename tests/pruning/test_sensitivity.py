"""Sensitivity curves equal pruning each layer by hand, leave the model untouched, and the greedy
proposal matches a hand-worked example."""
from __future__ import annotations

import copy

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import get_masks
from deepshrink.pruning import (
    MagnitudePruning,
    Sensitivity,
    TaylorPruning,
    layer_sensitivity,
    predicted_drop,
    propose_sparsities,
    prune,
    prune_report,
)
from deepshrink.training import accuracy


def test_curves_match_pruning_one_layer_by_hand_and_the_model_is_restored(trained_mlp, blobs):
    state = copy.deepcopy(trained_mlp.state_dict())
    result = layer_sensitivity(trained_mlp, blobs, (0.5, 0.9), accuracy_fn=accuracy)
    assert result.sizes == {"hidden.0": 128, "hidden.1": 256}
    val = blobs.loader("val", batch_size=512)
    assert result.baseline == accuracy(trained_mlp, val)
    for layer in ("hidden.0", "hidden.1"):
        for s in (0.5, 0.9):
            by_hand = copy.deepcopy(trained_mlp)
            prune(by_hand, MagnitudePruning(sparsity=s, scope="local", layers=(layer,)))
            assert result.accuracy[layer][s] == accuracy(by_hand, val), (layer, s)
    assert result.accuracy["hidden.1"][0.9] < result.baseline  # the sweep did prune something
    assert all(torch.equal(v, state[k]) for k, v in trained_mlp.state_dict().items())
    assert not get_masks(trained_mlp)


def test_taylor_curves_use_data_and_keep_earlier_masks(trained_mlp, blobs):
    prune(trained_mlp, MagnitudePruning(sparsity=0.3, scope="local"))
    masks = {n: m.clone() for n, m in get_masks(trained_mlp).items()}
    result = layer_sensitivity(trained_mlp, blobs, (0.5,), criterion=TaylorPruning(batches=2, batch_size=32), accuracy_fn=accuracy)
    assert set(result.accuracy) == {"hidden.0", "hidden.1"}
    assert all(torch.equal(get_masks(trained_mlp)[n], m) for n, m in masks.items())
    with pytest.raises(ConfigError, match=r"^criterion\.pattern: 2:4 fixes the sparsity"):
        layer_sensitivity(trained_mlp, blobs, criterion=MagnitudePruning(pattern="2:4"), accuracy_fn=accuracy)
    with pytest.raises(ConfigError, match=r"^sparsities: 1\.0 is outside \(0, 1\)"):
        layer_sensitivity(trained_mlp, blobs, (0.5, 1.0), accuracy_fn=accuracy)


# baseline 0.9; a (100 weights) is free to 0.5 then costly, b (300 weights) degrades slowly
CURVES = Sensitivity(baseline=0.9, sizes={"a": 100, "b": 300}, accuracy={"a": {0.5: 0.9, 0.9: 0.7}, "b": {0.5: 0.88, 0.9: 0.85}})


def test_greedy_proposal_for_a_target_sparsity_worked_by_hand():
    # cost per weight: a->0.5 is 0; then b->0.5 (0.02/150) beats b->0.9 (0.05/270) and a->0.9 (0.2/40);
    # then b->0.9 (0.03/120) wins but only 40 more weights are needed: b stops at 0.5 + 40/300
    proposal = propose_sparsities(CURVES, target_sparsity=0.6)
    assert proposal == pytest.approx({"a": 0.5, "b": 0.5 + 40 / 300})
    assert (100 * proposal["a"] + 300 * proposal["b"]) / 400 == pytest.approx(0.6)
    assert predicted_drop(CURVES, proposal) == pytest.approx(0.02 + 0.03 / 3)


def test_greedy_proposal_within_an_accuracy_budget():
    assert propose_sparsities(CURVES, max_drop=0.025) == {"a": 0.5, "b": 0.5}
    assert propose_sparsities(CURVES, max_drop=0.05) == {"a": 0.5, "b": 0.9}
    assert propose_sparsities(CURVES, max_drop=0.0) == {"a": 0.5, "b": 0.0}


def test_proposal_errors():
    with pytest.raises(ConfigError, match=r"^target_sparsity: 0\.95 is above what the measured curves reach \(0\.9\)"):
        propose_sparsities(CURVES, target_sparsity=0.95)
    with pytest.raises(ConfigError, match="give exactly one of target_sparsity or max_drop"):
        propose_sparsities(CURVES, target_sparsity=0.5, max_drop=0.01)


def test_proposal_feeds_overrides(trained_mlp, blobs):
    curves = layer_sensitivity(trained_mlp, blobs, (0.5, 0.7, 0.9), accuracy_fn=accuracy)
    proposal = propose_sparsities(curves, target_sparsity=0.75)
    report = prune_report(prune(trained_mlp, MagnitudePruning(scope="local", overrides=proposal)))
    assert report.sparsity == pytest.approx(0.75, abs=1 / 384)  # each layer rounds to whole weights
