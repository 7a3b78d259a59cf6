"""How many channels each group keeps, and which: pure functions of sizes and scores.

Widths are rounded to a multiple of the target's ``channel_multiple`` (8 for XNNPACK): its
kernels tile channels in blocks of 8, so 13 channels cost what 16 do and odd widths lose the
speed-up that pruning was for.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _half_up(value: float) -> int:
    # a hair above .5 so 500 * (1 - 0.9) = 49.999999999999993 still counts as 50
    return math.floor(value + 0.5 + 1e-9)


def round_channels(keep: float, original: int, multiple: int) -> int:
    """Channels a group of ``original`` keeps when the criterion asks for ``keep``.

    Nearest multiple of ``multiple`` (halves round up), at least one multiple (never zero
    channels), and never above ``original``: when the nearest multiple reaches or passes
    ``original`` the group keeps its ``original`` width. A group of ``multiple`` channels or
    fewer is not pruned (there is no smaller multiple to go to). ``multiple=1`` rounds to the
    nearest integer, at least 1.
    """
    if original <= 0:
        return original
    if multiple <= 1:
        return min(original, max(1, _half_up(keep)))
    if original <= multiple:
        return original
    kept = multiple * max(1, _half_up(keep / multiple))
    return original if kept >= original else kept


def local_counts(sizes: Sequence[int], ratios: Sequence[float], multiple: int, *, reference: Sequence[int] | None = None) -> list[int]:
    """Each group keeps ``(1 - ratio)`` of its ``reference`` size (default: its size), rounded."""
    reference = sizes if reference is None else reference
    return [round_channels(ref * (1.0 - r), n, multiple) for n, r, ref in zip(sizes, ratios, reference)]


def global_counts(scores: Sequence[torch.Tensor], ratio: float, multiple: int, *, reference: Sequence[int] | None = None) -> list[int]:
    """Rank every channel of every group together; keep ``(1 - ratio)`` of the reference total.

    Scores are divided by their group's mean first: groups differ in fan-in and in how many
    slices are coupled, and raw sums would make wide groups look important. Each group's
    survivors are then rounded with ``round_channels``.
    """
    sizes = [len(s) for s in scores]
    if not sizes:
        return []
    reference = sizes if reference is None else reference
    normalized = [s.double() / s.double().mean() if float(s.double().mean()) > 0 else torch.ones(len(s), dtype=torch.float64) for s in scores]
    flat = torch.cat(normalized)
    remove = min(len(flat), max(0, len(flat) - _half_up((1.0 - ratio) * sum(reference))))
    doomed = torch.zeros(len(flat), dtype=torch.bool)
    doomed[torch.sort(flat, stable=True).indices[:remove]] = True
    survivors = [int((~d).sum()) for d in doomed.split(sizes)]
    return [round_channels(k, n, multiple) for k, n in zip(survivors, sizes)]


def top_channels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` highest scores (ties: the lower index stays)."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[torch.sort(scores.double(), descending=True, stable=True).indices[:count]] = True
    return keep
