"""Sparsity schedules: pure functions of the step, and the plain-data configs that name them.

A step is one training epoch (``ScheduledPruning`` prunes between epochs). The target
sparsity always comes from the pruning config (``config.sparsity``), so it is written in one
place; a schedule only says how to get there:

- ``OneShot``: prune once to the target at epoch 0, then fine-tune.
- ``Iterative`` (Han et al. 2015): prune, retrain ``epochs_per_step`` epochs, prune further...
  through the stops ``sparsities`` and finally the target.
- ``Gradual`` (Zhu & Gupta 2017): every ``interval`` epochs from ``start``, ``steps`` times,
  prune to ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` — fast while many
  redundant weights remain, slowly near the target.
"""
from __future__ import annotations

from dataclasses import dataclass

from deepshrink.core.config import check
from deepshrink.core.errors import ConfigError


def one_shot_sparsity(step: int, *, final: float) -> float:
    """Sparsity in effect at ``step``: the target from step 0 on."""
    return final if step >= 0 else 0.0


def iterative_sparsity(step: int, *, stops: tuple[float, ...], final: float, epochs_per_step: int) -> float:
    """Sparsity in effect at ``step`` when pruning to ``(*stops, final)`` every ``epochs_per_step``."""
    if step < 0:
        return 0.0
    levels = (*stops, final)
    return levels[min(step // epochs_per_step, len(levels) - 1)]


def cubic_sparsity(step: float, *, initial: float, final: float, start: int, steps: int, interval: int) -> float:
    """Zhu & Gupta's ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3``, held at ``s_i`` before
    ``t0`` and at ``s_f`` after ``t0 + n dt``."""
    progress = (step - start) / (steps * interval)
    if progress <= 0.0:  # the ends exactly, not within rounding: the last prune must hit the target
        return initial
    if progress >= 1.0:
        return final
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class OneShot:
    """Prune once to the target, before the first epoch."""


@dataclass(frozen=True)
class Iterative:
    """Prune to each of ``sparsities`` and then to the target, retraining ``epochs_per_step`` epochs after each."""

    sparsities: tuple[float, ...] = (0.5, 0.75)
    epochs_per_step: int = 1

    def __post_init__(self) -> None:
        check(self.epochs_per_step >= 1, "epochs_per_step", f"{self.epochs_per_step} must be >= 1")
        for i, s in enumerate(self.sparsities):
            check(0.0 <= s < 1.0, f"sparsities[{i}]", f"{s} is outside [0, 1)")
        check(list(self.sparsities) == sorted(set(self.sparsities)), "sparsities",
              f"{list(self.sparsities)} must rise step by step, e.g. [0.5, 0.75]")


@dataclass(frozen=True)
class Gradual:
    """Zhu & Gupta 2017: ``steps`` prunes, ``interval`` epochs apart from epoch ``start``, from ``initial`` up to the target."""

    initial: float = 0.0
    start: int = 0
    steps: int = 4
    interval: int = 1

    def __post_init__(self) -> None:
        check(0.0 <= self.initial < 1.0, "initial", f"{self.initial} is outside [0, 1)")
        check(self.start >= 0, "start", f"{self.start} must be >= 0")
        check(self.steps >= 1, "steps", f"{self.steps} must be >= 1")
        check(self.interval >= 1, "interval", f"{self.interval} must be >= 1")


Schedule = OneShot | Iterative | Gradual
SCHEDULES: dict[str, type] = {"one-shot": OneShot, "iterative": Iterative, "gradual": Gradual}   # a recipe's names


def prune_points(schedule: Schedule, final: float) -> list[tuple[int, float]]:
    """``[(epoch, sparsity), ...]``: prune to ``sparsity`` before ``epoch``; the last one is ``final``."""
    if isinstance(schedule, OneShot):
        return [(0, one_shot_sparsity(0, final=final))]
    if isinstance(schedule, Iterative):
        if schedule.sparsities and schedule.sparsities[-1] >= final:
            raise ConfigError(f"schedule.sparsities: {list(schedule.sparsities)} must stay below the target sparsity "
                              f"{final} (the last step always prunes to it); drop the stops at or above it")
        e = schedule.epochs_per_step
        return [(k * e, iterative_sparsity(k * e, stops=schedule.sparsities, final=final, epochs_per_step=e))
                for k in range(len(schedule.sparsities) + 1)]
    if isinstance(schedule, Gradual):
        if schedule.initial >= final:
            raise ConfigError(f"schedule.initial: {schedule.initial} must be below the target sparsity {final}")
        # t0 prunes to s_i (s_i > 0 starts from a pruned model); t0 + n dt reaches s_f exactly
        first = 0 if schedule.initial > 0 else 1
        return [(t, cubic_sparsity(t, initial=schedule.initial, final=final, start=schedule.start,
                                   steps=schedule.steps, interval=schedule.interval))
                for t in (schedule.start + k * schedule.interval for k in range(first, schedule.steps + 1))]
    raise ConfigError(f"schedule: {type(schedule).__name__} is not a schedule; use OneShot, Iterative or Gradual")
