"""Prune on a schedule: alternate ``prune`` at the scheduled sparsities with ``training.fit`` epochs.

Masks compose (``prune`` ranks already-pruned weights lowest and never revives one) and ``fit``
re-applies them after every optimizer step, so each round starts from the last one's zeros and
the final round lands exactly on ``config.sparsity``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.data.splits import DataSplits
from deepshrink.ops.masks import NM
from deepshrink.pruning.api import PruneReport, prune
from deepshrink.pruning.configs import PruningConfig
from deepshrink.pruning.schedules import OneShot, Schedule, prune_points
from deepshrink.training import History, TrainConfig, fit


@dataclass
class ScheduleStep:
    """One round: the prune before ``epoch`` (``report`` None for dense warm-up epochs) and the
    training that followed it until the next round."""

    epoch: int
    sparsity: float
    report: PruneReport | None
    history: History = field(default_factory=History)


def _at_sparsity(config: PruningConfig, sparsity: float) -> PruningConfig:
    # overrides and groups ramp with the schedule, reaching their own values in the last round
    ratio = sparsity / config.sparsity if config.sparsity > 0 else 1.0
    return replace(
        config, sparsity=sparsity,
        overrides={k: v * ratio for k, v in config.overrides.items()},
        groups={k: v * ratio for k, v in config.groups.items()},
    )


def prune_with_schedule(
    model: nn.Module,
    config: PruningConfig,
    schedule: Schedule,
    *,
    data: DataSplits,
    train_config: TrainConfig,
    teacher: nn.Module | None = None,
    progress: bool | None = False,
) -> list[ScheduleStep]:
    """Prune ``model`` in place to ``config.sparsity`` along ``schedule`` over ``train_config.epochs`` epochs.

    Each round prunes at its epoch, then trains until the next round's epoch (the last round
    until ``train_config.epochs``) with one ``fit`` call; the learning-rate schedule therefore
    restarts every round (as in Han et al.'s prune-retrain cycles). Each round's ``fit`` uses
    seed ``train_config.seed + epoch`` so rounds do not replay the same batch order.
    ``teacher``: distil from it during every round when ``train_config.distill`` is set.
    """
    if not isinstance(schedule, OneShot) and isinstance(config.parsed_pattern, NM):
        raise ConfigError(f"schedule: pattern {config.pattern} fixes every layer's sparsity at {config.sparsity:g}, "
                          f"so it cannot be reached step by step; use OneShot() or an element/block pattern")
    if config.sparsity is None:
        raise ConfigError(f"schedule: {type(config).__name__} without a sparsity learns its own during its training; "
                          "a schedule needs a sparsity to ramp to: set sparsity, or drop the schedule")
    points = prune_points(schedule, config.sparsity)
    last_epoch = points[-1][0]
    if last_epoch > train_config.epochs:
        raise ConfigError(f"train_config.epochs: {train_config.epochs} ends before the schedule's last prune at epoch "
                          f"{last_epoch}; set epochs >= {last_epoch} (and more to fine-tune after it)")
    bounds = [e for e, _ in points] + [train_config.epochs]
    steps: list[ScheduleStep] = []
    if points[0][0] > 0:  # dense warm-up before the first prune
        steps.append(ScheduleStep(0, 0.0, None, _train(model, data, train_config, 0, points[0][0], teacher, progress)))
    for (epoch, sparsity), end in zip(points, bounds[1:]):
        report = prune(model, _at_sparsity(config, sparsity), data=data)
        steps.append(ScheduleStep(epoch, sparsity, report, _train(model, data, train_config, epoch, end, teacher, progress)))
    return steps


def _train(model, data, train_config: TrainConfig, start: int, end: int, teacher, progress) -> History:
    if end <= start:
        return History()
    return fit(model, data, replace(train_config, epochs=end - start, seed=train_config.seed + start),
               teacher=teacher, progress=progress)
