"""Pruning configs. Each criterion is one frozen dataclass; the handler is found by its type.

Every config shares *where* and *how much* (``PruningConfig``); subclasses add only what their
criterion needs (``TaylorPruning.batches``). All fields are plain data, so a recipe's
``prune: {method: taylor, sparsity: 0.8, pattern: "1x4"}`` maps onto them one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from deepshrink.core.config import check
from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import TrainConfig
from deepshrink.ops.masks import ELEMENT, NM, parse_pattern
from deepshrink.pruning.schedules import Gradual, Iterative, OneShot


@dataclass(frozen=True)
class PruningConfig:
    """What every pruning algorithm shares: how much, where, which layers, and in what pattern.

    ``sparsity``: fraction of the chosen weights to prune, in [0, 1).
    ``scope``: ``"global"`` ranks all chosen layers against one threshold (layers that matter
    less lose more); ``"local"`` prunes every layer to ``sparsity`` on its own.
    ``layers``: names or ``re:`` regexes of Conv/Linear modules to prune (empty = all).
    ``skip_first_conv`` / ``skip_classifier``: layers that are most sensitive and hold few
    weights; left dense unless a pattern in ``layers`` names them explicitly.
    ``groups``: ``{pattern: sparsity}``; the chosen layers a pattern matches (the first that
    matches, in order) share one threshold at that sparsity, e.g. ``{"re:hidden\\..*": 0.9}``.
    ``overrides``: per-layer sparsity by name or regex (local within the matched layer); an
    override beats a group, a group beats ``scope``.
    ``pattern``: ``"element"``; ``"N:M"`` such as ``"2:4"`` (N highest of every M consecutive
    input channels; then ``sparsity`` must be ``1 - N/M``); or a block ``"RxC"`` such as
    ``"1x4"`` (R output x C input channels pruned together). Quote ``"2:4"`` in YAML, which
    otherwise reads it as the base-60 number 124; the ``int`` in the type exists only to catch
    that and say so.
    """

    sparsity: float | None = 0.5
    scope: Literal["global", "local"] = "global"
    layers: tuple[str, ...] = ()
    skip_first_conv: bool = True
    skip_classifier: bool = True
    overrides: dict[str, float] = field(default_factory=dict)
    groups: dict[str, float] = field(default_factory=dict)
    pattern: str | int = "element"

    # a criterion that learns which weights to drop (``VariationalDropout``) may leave ``sparsity``
    # None: its scores are then > 0 exactly for the weights it keeps
    learns_sparsity: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.sparsity is None:
            check(self.learns_sparsity, "sparsity", f"is required for {type(self).__name__}, e.g. sparsity: 0.9 "
                  "(only a criterion that learns its own sparsity, such as variational dropout, may leave it out)")
            check(not (self.overrides or self.groups) and parse_pattern(self.pattern) == ELEMENT,
                  "sparsity", "a learned sparsity (sparsity: null) keeps what the criterion learned; "
                  "overrides, groups and patterns need a sparsity to rank by, so set one")
            return
        check(0.0 <= self.sparsity < 1.0, "sparsity", f"{self.sparsity} is outside [0, 1); use e.g. 0.9 to prune 90 % of weights")
        for name, value in self.overrides.items():
            check(0.0 <= value < 1.0, f"overrides.{name}", f"{value} is outside [0, 1)")
        for name, value in self.groups.items():
            check(0.0 <= value < 1.0, f"groups.{name}", f"{value} is outside [0, 1)")
        pattern = parse_pattern(self.pattern)
        if isinstance(pattern, NM):
            # N:M fixes the sparsity of every pruned layer; a different number would be silently ignored
            check(abs(self.sparsity - pattern.sparsity) < 1e-9, "sparsity",
                  f"{self.sparsity} does not match pattern {self.pattern}, which prunes exactly {pattern.m - pattern.n} "
                  f"of every {pattern.m} weights; set sparsity: {pattern.sparsity:g}")
            if self.overrides or self.groups:
                key = "overrides" if self.overrides else "groups"
                raise ConfigError(f"{key}: not supported with pattern {self.pattern}, which gives every pruned layer "
                                  f"sparsity {pattern.sparsity:g}; choose the layers to prune with `layers` instead")

    @property
    def parsed_pattern(self):
        """The pattern as ``ops.masks.Block`` or ``ops.masks.NM``."""
        return parse_pattern(self.pattern)


@dataclass(frozen=True)
class MagnitudePruning(PruningConfig):
    """Prune the smallest |w| (L1) or w^2 (L2); the two rank single weights identically."""

    norm: Literal["l1", "l2"] = "l1"


@dataclass(frozen=True)
class BatchScoredPruning(PruningConfig):
    """Base of criteria that average a statistic over ``batches`` batches of ``data.train``.

    Batches are drawn shuffled with ``seed`` (a dataset sorted by class would otherwise give
    the gradients of one class only), with the model in eval mode so dropout and batch-norm
    statistics do not make scores depend on the draw.
    """

    batches: int = 8
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.batches >= 1, "batches", f"{self.batches} must be >= 1")
        check(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")


@dataclass(frozen=True)
class GradientPruning(BatchScoredPruning):
    """Prune the weights the loss is least sensitive to: score = mean over batches of |dL/dw|."""


@dataclass(frozen=True)
class TaylorPruning(BatchScoredPruning):
    """First-order Taylor estimate of the loss change when a weight is zeroed (Molchanov et al.
    2019): score = mean over batches of |w * dL/dw|."""


@dataclass(frozen=True)
class RandomPruning(PruningConfig):
    """Uniformly random scores from ``seed``: the baseline every other criterion must beat."""

    seed: int = 0


@dataclass(frozen=True)
class ScheduledPruning:
    """Reach ``pruning`` (a criterion and its target ``sparsity``) along ``schedule``, training between prunes.

    ``schedule``: ``OneShot()`` (prune once, then train), ``Iterative`` (Han et al.'s
    prune-retrain cycles) or ``Gradual`` (Zhu & Gupta's cubic ramp); see ``pruning.schedules``.
    ``train``: the whole run's training, ``train.epochs`` in all: each round prunes at its epoch
    and trains until the next one (the last until ``train.epochs``), with one call of the loop
    and seed ``train.seed + epoch``; the learning-rate schedule restarts every round.
    A teacher given to ``prune`` is distilled from in every round when ``train.distill`` is set.
    Masks compose, so each round starts from the last one's zeros and the last lands exactly on
    ``pruning.sparsity``.
    """

    pruning: PruningConfig = field(default_factory=lambda: MagnitudePruning(sparsity=0.9))
    schedule: OneShot | Iterative | Gradual = field(default_factory=OneShot)
    train: TrainConfig = field(default_factory=TrainConfig)
