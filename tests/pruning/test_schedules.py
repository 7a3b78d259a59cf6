"""Schedules: hand-computed values of the pure functions, and the driver landing on the target."""
from __future__ import annotations

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import get_masks
from deepshrink.pruning import Gradual, Iterative, MagnitudePruning, OneShot, cubic_sparsity, prune_points, prune_with_schedule
from deepshrink.pruning.schedules import iterative_sparsity, one_shot_sparsity
from deepshrink.training import TrainConfig, fit

ZHU = dict(initial=0.0, final=0.8, start=2, steps=4, interval=3)  # t0 = 2, n dt = 12


def test_cubic_schedule_at_start_middle_and_end():
    assert cubic_sparsity(2, **ZHU) == 0.0
    assert cubic_sparsity(8, **ZHU) == pytest.approx(0.8 - 0.8 * 0.5**3) == pytest.approx(0.7)
    assert cubic_sparsity(5, **ZHU) == pytest.approx(0.8 - 0.8 * 0.75**3) == pytest.approx(0.4625)
    assert cubic_sparsity(14, **ZHU) == 0.8
    assert cubic_sparsity(0, **ZHU) == 0.0 and cubic_sparsity(30, **ZHU) == 0.8  # held outside [t0, t0 + n dt]
    assert cubic_sparsity(2, **{**ZHU, "initial": 0.2}) == 0.2


def test_one_shot_and_iterative_step_functions():
    assert [one_shot_sparsity(t, final=0.9) for t in (-1, 0, 5)] == [0.0, 0.9, 0.9]
    levels = [iterative_sparsity(t, stops=(0.5, 0.75), final=0.9, epochs_per_step=2) for t in range(7)]
    assert levels == [0.5, 0.5, 0.75, 0.75, 0.9, 0.9, 0.9]


def test_prune_points():
    assert prune_points(OneShot(), 0.9) == [(0, 0.9)]
    assert prune_points(Iterative(sparsities=(0.5, 0.75), epochs_per_step=2), 0.9) == [(0, 0.5), (2, 0.75), (4, 0.9)]
    points = prune_points(Gradual(start=1, steps=4, interval=2), 0.8)
    assert [e for e, _ in points] == [3, 5, 7, 9]
    assert [s for _, s in points] == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert points[-1][1] == 0.8


@pytest.mark.parametrize("schedule, message", [
    (Iterative(sparsities=(0.5, 0.9)), r"^schedule\.sparsities: \[0\.5, 0\.9\] must stay below the target sparsity 0\.9"),
    (Gradual(initial=0.95), r"^schedule\.initial: 0\.95 must be below the target sparsity 0\.9"),
])
def test_schedule_that_cannot_reach_the_target_is_an_error(schedule, message):
    with pytest.raises(ConfigError, match=message):
        prune_points(schedule, 0.9)


def test_iterative_pruning_reaches_the_final_sparsity_exactly(trained_mlp, blobs):
    steps = prune_with_schedule(trained_mlp, MagnitudePruning(sparsity=0.9), Iterative(sparsities=(0.5, 0.75)),
                                data=blobs, train_config=TrainConfig(epochs=3, lr=1e-2, batch_size=32), train_fn=fit)
    total = 128 + 256
    assert [(s.epoch, s.sparsity) for s in steps] == [(0, 0.5), (1, 0.75), (2, 0.9)]
    assert [sum(t - k for k, t in s.report.layers.values()) for s in steps] == [192, 288, round(0.9 * total)]
    assert [len(s.history.val_accuracy) for s in steps] == [1, 1, 1]
    masks = get_masks(trained_mlp)
    params = {n: trained_mlp.get_submodule(n[: -len(".weight")]).weight for n in masks}
    assert sum(int((params[n] == 0).sum()) for n in masks) == 346
    assert all(bool((params[n][~m] == 0).all()) for n, m in masks.items())


def test_gradual_pruning_warms_up_dense_then_ramps_overrides_with_it(trained_mlp, blobs):
    config = MagnitudePruning(sparsity=0.8, overrides={"hidden.0": 0.4})
    steps = prune_with_schedule(trained_mlp, config, Gradual(start=1, steps=2, interval=1),
                                data=blobs, train_config=TrainConfig(epochs=4, lr=1e-2, batch_size=32), train_fn=fit)
    assert [(s.epoch, s.report is None) for s in steps] == [(0, True), (2, False), (3, False)]
    assert [s.sparsity for s in steps] == pytest.approx([0.0, 0.7, 0.8])
    assert steps[1].report.layers["hidden.0"] == (128 - round(0.35 * 128), 128)  # 0.4 * 0.7 / 0.8
    assert steps[2].report.layers == {"hidden.0": (128 - 51, 128), "hidden.1": (256 - 205, 256)}
    assert [len(s.history.val_accuracy) for s in steps] == [2, 1, 1]  # s_i = 0 at t0: dense until t0 + dt


def test_driver_errors_name_the_fix(trained_mlp, blobs):
    with pytest.raises(ConfigError, match=r"^train_config\.epochs: 1 ends before the schedule's last prune at epoch 2"):
        prune_with_schedule(trained_mlp, MagnitudePruning(sparsity=0.9), Iterative(), data=blobs, train_config=TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match=r"^schedule: pattern 2:4 fixes every layer's sparsity at 0\.5.*use OneShot\(\)"):
        prune_with_schedule(trained_mlp, MagnitudePruning(pattern="2:4"), Gradual(), data=blobs, train_config=TrainConfig(epochs=4))
    assert not get_masks(trained_mlp)  # nothing was pruned before the error


def test_one_shot_with_zero_epochs_only_prunes(trained_mlp, blobs):
    before = {n: p.detach().clone() for n, p in trained_mlp.named_parameters()}
    steps = prune_with_schedule(trained_mlp, MagnitudePruning(sparsity=0.5, pattern="2:4"), OneShot(),
                                data=blobs, train_config=TrainConfig(epochs=0))
    assert steps[0].report.sparsity == 0.5 and steps[0].history.val_accuracy == []
    w = trained_mlp.hidden[1].weight.detach()
    assert torch.equal(w[w != 0], before["hidden.1.weight"][w != 0])
