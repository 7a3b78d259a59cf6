"""``ScheduledPruning``: alternate prunes at the scheduled sparsities with rounds of training.

Masks compose (``prune_weights`` ranks already-pruned weights lowest and never revives one) and
the module holds them (``core.masks``), so whatever loop trains between rounds keeps the pruned
weights at 0: each round starts from the last one's zeros and the final round lands exactly on
the target sparsity. The loop is passed in (``train_fn``, see ``core.loops``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import History, TrainConfig, TrainFn, run_training
from deepshrink.data.splits import DataSplits
from deepshrink.ops.masks import NM
from deepshrink.pruning.api import PRUNERS, PruneCall, PruneReport, prune_weights
from deepshrink.pruning.configs import PruningConfig, ScheduledPruning
from deepshrink.pruning.schedules import OneShot, Schedule, prune_points


@dataclass
class ScheduleStep:
    """One round: the prune before ``epoch`` (``report`` None for dense warm-up epochs) and what
    the training that followed it until the next round returned (``fit``'s ``History``; an empty
    one when the round had no epochs; whatever a loop of your own returned)."""

    epoch: int
    sparsity: float
    report: PruneReport | None
    history: Any = field(default_factory=History)


@dataclass
class ScheduleReport:
    """Every round of a ``ScheduledPruning``; ``layers`` / ``sparsity`` are the last prune's."""

    steps: list[ScheduleStep] = field(default_factory=list)

    @property
    def final(self) -> PruneReport:
        return next(s.report for s in reversed(self.steps) if s.report is not None)

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        return self.final.layers

    @property
    def sparsity(self) -> float:
        return self.final.sparsity

    def as_dict(self) -> dict:
        return {**self.final.as_dict(), "rounds": [
            {"epoch": s.epoch, "sparsity": s.sparsity, "val_accuracy": list(getattr(s.history, "val_accuracy", None) or [])}
            for s in self.steps]}


def _at_sparsity(config: PruningConfig, sparsity: float) -> PruningConfig:
    # overrides and groups ramp with the schedule, reaching their own values in the last round
    ratio = sparsity / config.sparsity if config.sparsity > 0 else 1.0
    return replace(
        config, sparsity=sparsity,
        overrides={k: v * ratio for k, v in config.overrides.items()},
        groups={k: v * ratio for k, v in config.groups.items()},
    )


def run_schedule(model: nn.Module, config: ScheduledPruning, *, data: DataSplits | None, train_fn: TrainFn | None,
                 teacher: nn.Module | None = None, train_key: str = "train") -> ScheduleReport:
    """Checks everything before the first prune (``train_key`` names the training in messages)."""
    pruning, schedule, train = config.pruning, config.schedule, config.train
    if not isinstance(pruning, PruningConfig):
        raise ConfigError(f"ScheduledPruning.pruning: expected a criterion such as MagnitudePruning, got {type(pruning).__name__}")
    if pruning.sparsity is None:
        raise ConfigError(f"schedule: {type(pruning).__name__} without a sparsity learns its own during its training; "
                          "a schedule needs a sparsity to ramp to: set sparsity, or drop the schedule")
    if not isinstance(schedule, OneShot) and isinstance(pruning.parsed_pattern, NM):
        raise ConfigError(f"schedule: pattern {pruning.pattern} fixes every layer's sparsity at {pruning.sparsity:g}, "
                          f"so it cannot be reached step by step; use OneShot() or an element/block pattern")
    points = prune_points(schedule, pruning.sparsity)
    last_epoch = points[-1][0]
    if last_epoch > train.epochs:
        raise ConfigError(f"{train_key}.epochs: {train.epochs} ends before the schedule's last prune at epoch "
                          f"{last_epoch}; set epochs >= {last_epoch} (and more to fine-tune after it)")
    if data is None:
        raise ConfigError("ScheduledPruning trains between prunes: pass data=DataSplits(...)")
    bounds = [e for e, _ in points] + [train.epochs]
    if train_fn is None and any(end > start for start, end in zip([0, *bounds], bounds)):
        run_training(None, model, data, train, who="ScheduledPruning")   # raises, naming the fix

    def rounds(start: int, end: int):
        if end <= start:
            return History()
        return run_training(train_fn, model, data, replace(train, epochs=end - start, seed=train.seed + start),
                            who="ScheduledPruning", teacher=teacher)

    report = ScheduleReport()
    if points[0][0] > 0:  # dense warm-up before the first prune
        report.steps.append(ScheduleStep(0, 0.0, None, rounds(0, points[0][0])))
    for (epoch, sparsity), end in zip(points, bounds[1:]):
        pruned = prune_weights(model, _at_sparsity(pruning, sparsity), data=data, train_fn=train_fn)
        report.steps.append(ScheduleStep(epoch, sparsity, pruned, rounds(epoch, end)))
    return report


@PRUNERS.register(ScheduledPruning)
def _scheduled(model: nn.Module, config: ScheduledPruning, call: PruneCall) -> ScheduleReport:
    return run_schedule(model, config, data=call.data, train_fn=call.train_fn, teacher=call.teacher)


def prune_with_schedule(
    model: nn.Module,
    config: PruningConfig,
    schedule: Schedule,
    *,
    data: DataSplits,
    train_config: TrainConfig,
    teacher: nn.Module | None = None,
    train_fn: TrainFn | None = None,
    progress: bool | None = False,
) -> list[ScheduleStep]:
    """Deprecated: ``prune(model, ScheduledPruning(config, schedule, train=train_config), data=data,
    train_fn=...)``, then ``prune_report(model).steps``. ``deepshrink.prune`` passes
    ``deepshrink.training.fit`` as the loop; here, without ``train_fn``, the call fails."""
    warnings.warn("prune_with_schedule is deprecated and will be removed in the next release: use "
                  "deepshrink.prune(model, ScheduledPruning(config, schedule, train=...), data=data)",
                  DeprecationWarning, stacklevel=2)
    return run_schedule(model, ScheduledPruning(config, schedule, train_config), data=data, train_fn=train_fn,
                        teacher=teacher, train_key="train_config").steps
