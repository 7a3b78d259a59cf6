"""Pruning: score weights, pick a mask, apply it; finalize makes the result really smaller.

- criteria (configs): ``MagnitudePruning``, ``GradientPruning``, ``TaylorPruning``, ``RandomPruning``,
  and ``VariationalDropout``, which learns the sparsity per layer by training;
  add one with a ``PruningConfig`` subclass and ``register_criterion`` (see ``pruning.importance``);
- where and how: ``scope`` / ``groups`` / ``overrides`` / ``pattern`` on every config;
- when: ``prune_with_schedule`` with ``OneShot``, ``Iterative`` or ``Gradual``;
- how much per layer: ``layer_sensitivity`` then ``propose_sparsities``.
"""
from deepshrink.pruning.api import PruneReport, finalize, prunable_weights, prune, register_criterion, score_weights
from deepshrink.pruning.configs import (
    BatchScoredPruning,
    GradientPruning,
    MagnitudePruning,
    PruningConfig,
    RandomPruning,
    TaylorPruning,
)
from deepshrink.pruning.iterative import ScheduleStep, prune_with_schedule
from deepshrink.pruning.schedules import Gradual, Iterative, OneShot, cubic_sparsity, prune_points
from deepshrink.pruning.scopes import choose_masks
from deepshrink.pruning.variational import VariationalDropout, kl_to_log_uniform, log_alpha, variational_scores
from deepshrink.pruning.sensitivity import Sensitivity, layer_sensitivity, predicted_drop, propose_sparsities

__all__ = [
    "prune", "finalize", "PruneReport", "register_criterion", "score_weights", "prunable_weights", "choose_masks",
    "PruningConfig", "MagnitudePruning", "GradientPruning", "TaylorPruning", "RandomPruning", "BatchScoredPruning",
    "prune_with_schedule", "ScheduleStep", "OneShot", "Iterative", "Gradual", "cubic_sparsity", "prune_points",
    "layer_sensitivity", "propose_sparsities", "predicted_drop", "Sensitivity",
    "VariationalDropout", "variational_scores", "log_alpha", "kl_to_log_uniform",
]
