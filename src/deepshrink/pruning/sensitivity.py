"""Per-layer sensitivity: how much validation accuracy each layer loses when pruned alone.

``layer_sensitivity`` scores the weights once (any criterion), then for each layer and each
sparsity zeroes that layer only, measures accuracy on ``data.val`` and puts the weights back.
``propose_sparsities`` turns the curves into per-layer sparsities (usable as ``overrides``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import AccuracyFn, TrainFn, require_accuracy
from deepshrink.core.masks import get_masks
from deepshrink.core.progress import progress
from deepshrink.data.splits import DataSplits
from deepshrink.ops.masks import NM
from deepshrink.pruning.api import prunable_weights, rank_pruned_lowest, score_weights
from deepshrink.pruning.configs import MagnitudePruning, PruningConfig
from deepshrink.pruning.scopes import choose_masks, layer_of


@dataclass
class Sensitivity:
    """``accuracy[layer][sparsity]``: val accuracy with only ``layer`` pruned; ``sizes``: its weight count."""

    baseline: float
    sizes: dict[str, int] = field(default_factory=dict)
    accuracy: dict[str, dict[float, float]] = field(default_factory=dict)

    def drop(self, layer: str, sparsity: float) -> float:
        """Accuracy lost at a measured sparsity (0 at sparsity 0); a gain from noise counts as no loss."""
        if sparsity == 0.0:
            return 0.0
        return max(0.0, self.baseline - self.accuracy[layer][sparsity])

    def as_dict(self) -> dict:
        return {"baseline": self.baseline, "sizes": dict(self.sizes),
                "accuracy": {n: {str(s): a for s, a in c.items()} for n, c in self.accuracy.items()}}


def layer_sensitivity(
    model: nn.Module,
    data: DataSplits,
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95),
    *,
    criterion: PruningConfig | None = None,
    batch_size: int = 512,
    accuracy_fn: AccuracyFn | None = None,
    train_fn: TrainFn | None = None,
) -> Sensitivity:
    """Val accuracy of ``model`` with each prunable layer (per ``criterion``'s layer selection)
    pruned alone, locally, to each of ``sparsities``. The model is left exactly as it was.

    ``accuracy_fn``: the measure (``core.loops``; ``deepshrink.training.accuracy`` is one, the
    pipeline's); ``train_fn``: for a criterion that learns its scores (variational dropout)."""
    criterion = MagnitudePruning() if criterion is None else criterion
    accuracy = require_accuracy(accuracy_fn, who="layer_sensitivity")
    if isinstance(criterion.parsed_pattern, NM):
        raise ConfigError(f"criterion.pattern: {criterion.pattern} fixes the sparsity, so there is no curve to sweep; "
                          f"use pattern 'element' or a block such as '1x4'")
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise ConfigError(f"sparsities: {s} is outside (0, 1); use values such as 0.5, 0.9")
    weights = prunable_weights(model, criterion)
    previous = get_masks(model)
    scores = rank_pruned_lowest(score_weights(model, weights, criterion, data, train_fn=train_fn), previous)
    loader = data.loader("val", batch_size=batch_size)
    result = Sensitivity(baseline=accuracy(model, loader))
    for name, weight in progress(weights.items(), "sensitivity (layers)"):
        layer = layer_of(name)
        result.sizes[layer] = weight.numel()
        result.accuracy[layer] = {}
        original = weight.detach().clone()
        try:
            for s in sorted(sparsities):
                alone = replace(criterion, sparsity=s, scope="local", overrides={}, groups={})
                mask = choose_masks({name: scores[name]}, alone)[name]
                with torch.no_grad():
                    weight.mul_(mask.to(weight.dtype))
                result.accuracy[layer][s] = accuracy(model, loader)
                with torch.no_grad():
                    weight.copy_(original)
        finally:
            with torch.no_grad():
                weight.copy_(original)
    return result


def predicted_drop(sensitivity: Sensitivity, sparsities: Mapping[str, float]) -> float:
    """Sum of per-layer drops, linear between measured sparsities (layers assumed independent)."""
    return sum(_interpolated_drop(sensitivity, layer, s) for layer, s in sparsities.items())


def _levels(sensitivity: Sensitivity, layer: str) -> list[float]:
    return [0.0, *sorted(sensitivity.accuracy[layer])]


def _interpolated_drop(sensitivity: Sensitivity, layer: str, s: float) -> float:
    levels = _levels(sensitivity, layer)
    if s > levels[-1] + 1e-12:
        raise ConfigError(f"sparsities.{layer}: {s} is above the highest measured sparsity {levels[-1]}")
    for lo, hi in zip(levels, levels[1:]):
        if s <= hi:
            lo_drop, hi_drop = sensitivity.drop(layer, lo), sensitivity.drop(layer, hi)
            return lo_drop + (hi_drop - lo_drop) * (s - lo) / (hi - lo)
    return 0.0


def propose_sparsities(
    sensitivity: Sensitivity, *, target_sparsity: float | None = None, max_drop: float | None = None,
) -> dict[str, float]:
    """Per-layer sparsities that reach ``target_sparsity`` overall with the least predicted drop,
    or prune as much as possible while the predicted drop stays within ``max_drop``.

    Greedy: start dense; repeatedly move the one layer whose step to a higher measured sparsity
    costs the least predicted accuracy per weight removed (ties: more weights removed, then
    layer order). Drops add up across layers and are linear between measured points. For a
    target, the last move stops part-way, so the weighted mean sparsity equals the target
    (each layer then rounds to whole weights when pruned).
    """
    if (target_sparsity is None) == (max_drop is None):
        raise ConfigError("propose_sparsities: give exactly one of target_sparsity or max_drop")
    if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
        raise ConfigError(f"target_sparsity: {target_sparsity} is outside [0, 1)")
    if max_drop is not None and max_drop < 0:
        raise ConfigError(f"max_drop: {max_drop} must be >= 0 (an accuracy fraction, e.g. 0.01 for one point)")
    layers = list(sensitivity.accuracy)
    total = sum(sensitivity.sizes[n] for n in layers)
    current = {n: 0.0 for n in layers}
    removed = spent = 0.0
    needed = target_sparsity * total if target_sparsity is not None else float("inf")
    while removed < needed - 1e-9:
        moves = []
        for order, n in enumerate(layers):
            for s in _levels(sensitivity, n):
                if s <= current[n]:
                    continue
                gain = sensitivity.sizes[n] * (s - current[n])
                cost = sensitivity.drop(n, s) - _interpolated_drop(sensitivity, n, current[n])
                if max_drop is None or spent + cost <= max_drop + 1e-12:
                    moves.append((cost / gain, -gain, order, n, s, cost, gain))
        if not moves:
            if target_sparsity is not None:
                best = sum(sensitivity.sizes[n] * _levels(sensitivity, n)[-1] for n in layers) / max(total, 1)
                raise ConfigError(f"target_sparsity: {target_sparsity} is above what the measured curves reach ({best:.4g}); "
                                  f"measure higher sparsities with layer_sensitivity")
            break
        _, _, _, n, s, cost, gain = min(moves)
        if removed + gain > needed:  # stop part-way: exactly the weights still needed
            s = current[n] + (needed - removed) / sensitivity.sizes[n]
            cost = _interpolated_drop(sensitivity, n, s) - _interpolated_drop(sensitivity, n, current[n])
            gain = needed - removed
        current[n], removed, spent = s, removed + gain, spent + cost
    return current
