"""Pruning configs. Each algorithm is one frozen dataclass; the handler is found by its type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deepshrink.core.config import check


@dataclass(frozen=True)
class PruningConfig:
    """What every pruning algorithm shares: how much, where, and which layers.

    ``layers``: names or ``re:`` regexes of Conv/Linear modules to prune (empty = all).
    ``skip_first_conv`` / ``skip_classifier``: layers that are most sensitive and hold few
    weights; left dense unless a pattern in ``layers`` names them explicitly.
    ``overrides``: per-layer sparsity by name or regex (local within the matched layer).
    """

    sparsity: float = 0.5
    scope: Literal["global", "local"] = "global"
    layers: tuple[str, ...] = ()
    skip_first_conv: bool = True
    skip_classifier: bool = True
    overrides: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(0.0 <= self.sparsity < 1.0, "sparsity", f"{self.sparsity} is outside [0, 1); use e.g. 0.9 to prune 90 % of weights")
        for name, value in self.overrides.items():
            check(0.0 <= value < 1.0, f"overrides.{name}", f"{value} is outside [0, 1)")


@dataclass(frozen=True)
class MagnitudePruning(PruningConfig):
    """Prune the smallest |w| (L1) or w^2 (L2); the two rank single weights identically."""

    norm: Literal["l1", "l2"] = "l1"
