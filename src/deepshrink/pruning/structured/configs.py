"""The structured-pruning configs: plain frozen data, so a recipe maps onto them one to one.

``ChannelPruning``: whole output channels of Conv/Linear layers (CNNs, MLPs).
``TransformerPruning``: whole attention heads and feed-forward neurons (``transformer``).
"""
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


UnitImportance = Literal["l1", "l2", "taylor"]


@dataclass(frozen=True)
class TransformerPruning:
    """Remove whole attention heads and feed-forward neurons, so every block gets narrower.

    ``heads``: per attention block, an int is the number of heads to remove (each block keeps at
    least one: a count that would leave none is an error naming the block), a float in [0, 1) the
    fraction (rounded to the nearest head, halves up, at most all but one). ``ffn``: fraction of
    every feed-forward's hidden neurons to remove, in [0, 1); the kept width is rounded to a
    multiple of ``round_to`` (None: the target's ``channel_multiple``; see ``widths.round_channels``).
    ``importance``: ``"l1"`` / ``"l2"``: norm of all weights coupled to the unit (q/k/v rows and
    out-projection columns of a head; up/gate rows and the down-projection column of a neuron);
    ``"taylor"``: (sum over the coupled weights and biases of w * dL/dw)^2, averaged over
    ``batches`` batches of ``data.train`` (or, without data, ``batches`` passes over the example
    input). L is the cross-entropy with the labels when the data is labelled, else ``r . y`` with
    ``y`` the model's first output and ``r`` a fresh seeded Gaussian probe each batch, whose score
    estimates the squared change of ``y`` when the unit goes (no labels needed).
    ``layers`` / ``skip``: names or ``re:`` regexes of the blocks to prune / leave alone; a pattern
    may name the attention module, the feed-forward's module, one of their layers or any module
    above them (``encoder.layer.0`` means both blocks of that layer); empty ``layers``: all blocks.
    ``block_sensitivity``: also measure, on the example input, the first output's change (SQNR, cosine)
    when each block alone is pruned as chosen, so the report shows which blocks tolerate it.
    """

    heads: int | float = 0.25
    ffn: float = 0.25
    importance: UnitImportance = "l1"
    layers: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    round_to: int | None = None
    block_sensitivity: bool = True   # not ``sensitivity``: a prune stage reads that key as the sensitivity sweep
    batches: int = 8
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        heads, ffn = self.heads, self.ffn
        if isinstance(heads, bool) or not isinstance(heads, (int, float)):
            check(False, "heads", f"{heads!r} is not a number; give a count of heads to remove (e.g. 1) or a fraction in [0, 1)")
        elif isinstance(heads, int):
            check(heads >= 0, "heads", f"{heads} is negative; give the number of heads to remove per block, e.g. 1")
        else:
            check(0.0 <= heads < 1.0, "heads", f"{heads} is outside [0, 1) for a fraction; write an integer "
                  f"(heads: {max(int(heads), 1)}) to remove that many heads per block")
        check(isinstance(ffn, (int, float)) and not isinstance(ffn, bool) and 0.0 <= ffn < 1.0, "ffn",
              f"{ffn!r} is outside [0, 1); use e.g. 0.25 to remove a quarter of every feed-forward's neurons")
        check(self.importance in ("l1", "l2", "taylor"), "importance", f"{self.importance!r} is not one of 'l1', 'l2', 'taylor'")
        check(heads != 0 or ffn != 0, "heads", "and ffn are both 0: nothing to prune; set heads (e.g. 1) and/or ffn (e.g. 0.25)")
        check(self.round_to is None or self.round_to >= 1, "round_to", f"{self.round_to} must be >= 1 (or null for the target's multiple)")
        check(self.batches >= 1, "batches", f"{self.batches} must be >= 1")
        check(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
