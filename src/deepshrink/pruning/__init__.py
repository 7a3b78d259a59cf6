"""Pruning: one verb, ``prune(model, config)``, the algorithm chosen by the config's type.

- criteria (unstructured, masks held in the module): ``MagnitudePruning``, ``GradientPruning``,
  ``TaylorPruning``, ``RandomPruning``, and ``VariationalDropout``, which learns the sparsity per
  layer by training; add one with a ``PruningConfig`` subclass and ``register_criterion``;
- structured: ``ChannelPruning`` removes whole channels, ``TransformerPruning`` whole attention heads
  and feed-forward neurons (``pruning.structured``);
- scheduled: ``ScheduledPruning(criterion, OneShot() | Iterative(...) | Gradual(...), train=...)``;
- where and how: ``scope`` / ``groups`` / ``overrides`` / ``pattern`` on every criterion;
- how much per layer: ``layer_sensitivity`` then ``propose_sparsities``.

``prune`` changes the model in place and returns it; ``prune_report(model)`` says what it did;
``finalize`` makes it a plain module with exact zeros. The configs that train take their loop as
``train_fn`` (``core.loops``); ``deepshrink.prune`` supplies ``deepshrink.training.fit``.
"""
from deepshrink.pruning.api import (PRUNERS, PruneReport, finalize, prunable_weights, prune, prune_report, prune_weights,
                                    register_criterion, score_weights)
from deepshrink.pruning.configs import (
    BatchScoredPruning,
    GradientPruning,
    MagnitudePruning,
    PruningConfig,
    RandomPruning,
    ScheduledPruning,
    TaylorPruning,
)
from deepshrink.pruning.iterative import ScheduleReport, ScheduleStep, prune_with_schedule
from deepshrink.pruning.schedules import SCHEDULES, Gradual, Iterative, OneShot, cubic_sparsity, prune_points
from deepshrink.pruning.scopes import choose_masks
from deepshrink.pruning.variational import VariationalDropout, kl_to_log_uniform, log_alpha, variational_scores
from deepshrink.pruning.sensitivity import Sensitivity, layer_sensitivity, predicted_drop, propose_sparsities
from deepshrink.pruning.structured import (ChannelPruning, StructuredReport,  # registers both with prune
                                           TransformerPruning, TransformerReport)

__all__ = [
    "prune", "prune_report", "finalize", "PruneReport", "register_criterion", "score_weights", "prunable_weights",
    "choose_masks", "prune_weights", "PRUNERS",
    "PruningConfig", "MagnitudePruning", "GradientPruning", "TaylorPruning", "RandomPruning", "BatchScoredPruning",
    "ScheduledPruning", "ScheduleReport", "ScheduleStep", "OneShot", "Iterative", "Gradual", "SCHEDULES",
    "cubic_sparsity", "prune_points", "prune_with_schedule",
    "ChannelPruning", "StructuredReport", "TransformerPruning", "TransformerReport",
    "layer_sensitivity", "propose_sparsities", "predicted_drop", "Sensitivity",
    "VariationalDropout", "variational_scores", "log_alpha", "kl_to_log_uniform",
]
