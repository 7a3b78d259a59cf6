"""The ``prune`` verb: score, select, attach masks. ``finalize`` drops the masks for good.

The three steps stay separate so each can be reused on its own: ``score_weights`` (a criterion,
found by config type), ``choose_masks`` (scope, groups, overrides, pattern) and
``core.masks.attach_masks``. ``pruning.sensitivity`` scores once and selects many times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import attach_masks, detach_masks, get_masks
from deepshrink.core.registry import Registry
from deepshrink.core.selection import select, weighted_layers
from deepshrink.data.splits import DataSplits
from deepshrink.pruning.configs import (
    BatchScoredPruning,
    GradientPruning,
    MagnitudePruning,
    PruningConfig,
    RandomPruning,
    TaylorPruning,
)
from deepshrink.pruning.importance import gradient_scores, magnitude_scores, random_scores, taylor_scores, train_batches
from deepshrink.pruning.scopes import check_layer_patterns, choose_masks

Handler = Callable[[nn.Module, Mapping[str, nn.Parameter], PruningConfig, "DataSplits | None"], dict[str, torch.Tensor]]
_HANDLERS: Registry[Handler] = Registry("prune")


def register_criterion(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(model, weights, config, data) -> {weight name: scores}`` scores weights
    for ``config_type`` (a ``PruningConfig`` subclass). See ``pruning.importance`` for an example."""
    if not (isinstance(config_type, type) and issubclass(config_type, PruningConfig)):
        raise TypeError(f"register_criterion: {config_type!r} is not a PruningConfig subclass")
    return _HANDLERS.register(config_type)


@dataclass
class PruneReport:
    """Per-layer kept/total weights after pruning, and the overall sparsity of the chosen layers."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (kept, total)

    @property
    def sparsity(self) -> float:
        kept = sum(k for k, _ in self.layers.values())
        total = sum(t for _, t in self.layers.values())
        return 1.0 - kept / max(total, 1)

    def as_dict(self) -> dict:
        return {"sparsity": self.sparsity, "layers": {n: {"kept": k, "total": t} for n, (k, t) in self.layers.items()}}


def prunable_weights(model: nn.Module, config: PruningConfig) -> dict[str, nn.Parameter]:
    """``{"<module>.weight": parameter}`` of the layers the config selects.

    Raises ``ConfigError`` when a pattern in ``layers``, ``overrides`` or ``groups`` matches no
    pruned layer, or when nothing is left to prune.
    """
    layers = weighted_layers(model)
    names = list(layers)
    if config.layers:
        chosen = select(names, config.layers, what="prune.layers")
    else:
        convs = [n for n in names if isinstance(layers[n], nn.modules.conv._ConvNd)]
        skipped = set()
        if config.skip_first_conv and convs:
            skipped.add(convs[0])
        if config.skip_classifier and names:
            skipped.add(names[-1])
        chosen = [n for n in names if n not in skipped]
    if not chosen:
        raise ConfigError(f"prune.layers: no layer left to prune among {', '.join(names) or 'none'} "
                          f"(skip_first_conv / skip_classifier leave the rest dense); name the layers in `layers`")
    check_layer_patterns(config.overrides, chosen, names, what="prune.overrides")
    check_layer_patterns(config.groups, chosen, names, what="prune.groups")
    return {f"{n}.weight": layers[n].weight for n in chosen}


def score_weights(
    model: nn.Module, weights: Mapping[str, nn.Parameter], config: PruningConfig, data: DataSplits | None = None,
) -> dict[str, torch.Tensor]:
    """Run the criterion registered for ``type(config)``: one score per weight, higher = keep."""
    scores = _HANDLERS.handler_for(config)(model, weights, config, data)
    for name, w in weights.items():
        if name not in scores or tuple(scores[name].shape) != tuple(w.shape):
            got = tuple(scores[name].shape) if name in scores else "nothing"
            raise ValueError(f"{type(config).__name__}: its criterion must score every weight of {name!r} "
                             f"(shape {tuple(w.shape)}), got {got}")
    return {n: scores[n].detach() for n in weights}


def rank_pruned_lowest(scores: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Already-pruned weights get -inf, so a higher sparsity prunes them first and counts them."""
    return {n: torch.where(previous[n], s.double(), float("-inf")) if n in previous else s for n, s in scores.items()}


def prune(model: nn.Module, config: PruningConfig, *, data: DataSplits | None = None) -> PruneReport:
    """Attach masks to ``model`` (in place) that zero the least important weights.

    Masks compose with earlier ones: weights pruned before stay pruned (and count towards the
    new sparsity). Call ``finalize`` once fine-tuning is done.
    """
    weights = prunable_weights(model, config)
    previous = get_masks(model)
    scores = rank_pruned_lowest(score_weights(model, weights, config, data), previous)
    # a learned sparsity (``sparsity: None``): the criterion's scores are > 0 for the weights it keeps
    masks = {n: s > 0 for n, s in scores.items()} if config.sparsity is None else choose_masks(scores, config)
    # a lower sparsity than before must not revive a weight: its value is already gone
    masks = {n: m & previous[n] if n in previous else m for n, m in masks.items()}
    attach_masks(model, masks)
    final = get_masks(model)
    return PruneReport({n[: -len(".weight")]: (int(final[n].sum()), final[n].numel()) for n in weights})


def finalize(model: nn.Module) -> nn.Module:
    """Drop the masks: the zeros stay in the weights and no mask state remains on the module."""
    detach_masks(model)
    return model


@_HANDLERS.register(MagnitudePruning)
def _magnitude(model, weights, config: MagnitudePruning, data) -> dict[str, torch.Tensor]:
    return magnitude_scores(weights, config.norm)


def _batches(config: BatchScoredPruning, data: DataSplits | None):
    return train_batches(data, batches=config.batches, batch_size=config.batch_size, seed=config.seed, who=type(config).__name__)


@_HANDLERS.register(GradientPruning)
def _gradient(model, weights, config: GradientPruning, data) -> dict[str, torch.Tensor]:
    return gradient_scores(model, weights, _batches(config, data))


@_HANDLERS.register(TaylorPruning)
def _taylor(model, weights, config: TaylorPruning, data) -> dict[str, torch.Tensor]:
    return taylor_scores(model, weights, _batches(config, data))


@_HANDLERS.register(RandomPruning)
def _random(model, weights, config: RandomPruning, data) -> dict[str, torch.Tensor]:
    return random_scores(weights, config.seed)
