"""The structured-pruning config: plain frozen data, so a recipe maps onto it one to one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deepshrink.core.config import check
from deepshrink.core.loops import TrainConfig

Importance = Literal["l1", "l2", "bn_scale", "taylor"]


@dataclass(frozen=True)
class ChannelPruning:
    """Remove whole output channels (and every slice coupled to them) so layers get narrower.

    ``ratio``: fraction of the prunable channels to remove, in [0, 1). ``scope="local"`` removes
    ``ratio`` of every channel group; ``"global"`` ranks all groups' channels together (scores
    divided by their group's mean, so layers of different scale compare) and removes ``ratio``
    of all of them, so groups that matter less lose more.
    ``importance``: ``"l1"`` / ``"l2"``: norm of every weight slice coupled to the channel
    (producer rows, consumer columns, depthwise filters); ``"bn_scale"``: |gamma| of the
    coupled BatchNorms (network slimming; every pruned group needs one); ``"taylor"``: first-order
    Taylor estimate of the loss change, (sum of w * dL/dw over the coupled slices)^2 averaged over
    ``batches`` batches of ``data.train`` (Molchanov et al. 2019).
    ``round_to``: kept channels are a multiple of this (None: the target profile's
    ``channel_multiple``); see ``widths.round_channels`` for the direction.
    ``layers`` / ``skip``: names or ``re:`` regexes of Conv/Linear layers whose output channels may
    / may not be pruned (empty ``layers`` = all); a skipped layer also keeps every channel coupled
    to it. ``overrides``: ``{pattern: ratio}`` for groups containing a matching layer (the first
    pattern that matches any of the group's layers wins), used as a local ratio in both scopes.
    ``steps``: >1 prunes in equal steps of ``ratio / steps`` with fine-tuning between them,
    ``train`` each time (through ``prune``'s ``train_fn``); the last step is not fine-tuned here.
    """

    ratio: float = 0.5
    importance: Importance = "l1"
    scope: Literal["global", "local"] = "global"
    round_to: int | None = None
    layers: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    overrides: dict[str, float] = field(default_factory=dict)
    steps: int = 1
    batches: int = 8
    batch_size: int = 64
    seed: int = 0
    train: TrainConfig | None = None

    def __post_init__(self) -> None:
        check(0.0 <= self.ratio < 1.0, "ratio", f"{self.ratio} is outside [0, 1); use e.g. 0.5 to remove half the channels")
        for name, value in self.overrides.items():
            check(0.0 <= value < 1.0, f"overrides.{name}", f"{value} is outside [0, 1)")
        check(self.round_to is None or self.round_to >= 1, "round_to", f"{self.round_to} must be >= 1 (or null for the target's multiple)")
        check(self.steps >= 1, "steps", f"{self.steps} must be >= 1")
        check(self.batches >= 1, "batches", f"{self.batches} must be >= 1")
        check(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
