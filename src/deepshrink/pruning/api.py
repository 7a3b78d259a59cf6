"""The ``prune`` verb: one entry point, the algorithm chosen by the config's type.

- a criterion config (``MagnitudePruning``, ``GradientPruning``, ``TaylorPruning``, ``RandomPruning``,
  ``VariationalDropout``, or your own via ``register_criterion``): score, select, hold the masks
  in the module (``core.masks``; a ``PruneReport``);
- ``ChannelPruning``: remove whole channels, the model gets physically narrower (``pruning.structured``;
  a ``StructuredReport``);
- ``TransformerPruning``: remove whole attention heads and feed-forward neurons (``pruning.structured``;
  a ``TransformerReport``: heads / neurons and parameters before -> after, per-block sensitivity);
- ``ScheduledPruning``: a criterion reached along a schedule with training between prunes
  (``pruning.iterative``; a ``ScheduleReport``).

The steps of the unstructured path stay separate so each can be reused on its own:
``score_weights`` (a criterion, found by config type), ``choose_masks`` (scope, groups, overrides,
pattern) and ``core.masks.attach_masks``. ``pruning.sensitivity`` scores once and selects many times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import TrainFn
from deepshrink.core.masks import attach_masks, detach_masks, get_masks, raw_parameter
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

Criterion = Callable[[nn.Module, Mapping[str, nn.Parameter], PruningConfig, "DataSplits | None"], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PruneCall:
    """What a pruning handler gets besides the model and its config (``prune``'s keywords)."""

    data: DataSplits | None = None
    example_input: Any = None
    target: str = "xnnpack"
    train_fn: TrainFn | None = None
    teacher: nn.Module | None = None


# config type -> handler(model, config, call) -> report; the names are the recipe's ``method:``
PRUNERS: Registry[Callable[[nn.Module, Any, PruneCall], Any]] = Registry("prune")
# criterion config type -> scores(model, weights, config, data, train_fn)
_CRITERIA: Registry[Callable[..., dict[str, torch.Tensor]]] = Registry("prune criterion")
_REPORT = "_deepshrink_prune"


def register_criterion(config_type: type, *, name: str | None = None) -> Callable[[Criterion], Criterion]:
    """Decorator: ``handler(model, weights, config, data) -> {weight name: scores}`` scores weights
    for ``config_type`` (a ``PruningConfig`` subclass), which ``prune`` then accepts like the built-in
    criteria; ``name`` also makes it a recipe's ``method:``. See ``pruning.importance`` for an example."""
    if not (isinstance(config_type, type) and issubclass(config_type, PruningConfig)):
        raise TypeError(f"register_criterion: {config_type!r} is not a PruningConfig subclass")

    def decorate(handler: Criterion) -> Criterion:
        _register_scores(config_type, name=name)(lambda model, weights, config, data, train_fn: handler(model, weights, config, data))
        return handler

    return decorate


def _register_scores(config_type: type, *, name: str | None = None):
    """Internal form of ``register_criterion``: the handler also gets the ``train_fn`` (criteria that learn)."""
    def decorate(handler):
        _CRITERIA.register(config_type)(handler)
        PRUNERS.register(config_type, name=name)(_prune_by_scores)
        return handler

    return decorate


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


def prune(
    model: nn.Module,
    config: Any,
    *,
    data: DataSplits | None = None,
    example_input: Any = None,
    target: str = "xnnpack",
    train_fn: TrainFn | None = None,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Prune ``model`` in place as ``config`` says, and return it (the same object).

    The algorithm is the config's type (see the module doc). What was done — a ``PruneReport``,
    ``StructuredReport`` or ``ScheduleReport`` — is read back with ``prune_report(model)``.

    ``data``: the splits criteria score on and schedules train on. ``example_input``: a batch of
    real inputs ``ChannelPruning`` traces with and ``TransformerPruning`` measures on (default:
    ``data.example_batch(8)``). ``target``: its
    channel multiple rounds structured widths. ``train_fn``: the loop for the configs that train
    (``ScheduledPruning``, ``VariationalDropout``, ``ChannelPruning(steps > 1)``) — see ``core.loops``;
    ``deepshrink.prune`` passes ``deepshrink.training.fit``. ``teacher``: passed to ``train_fn`` for
    distillation (when the config's ``train.distill`` is set, or the data has no labels).

    Unstructured masks compose with earlier ones: weights pruned before stay pruned (and count
    towards the new sparsity). They are held by the module itself, so any training loop keeps the
    pruned weights at exactly 0; ``finalize`` makes the result a plain module.
    """
    handler = PRUNERS.handler_for(config)
    report = handler(model, config, PruneCall(data=data, example_input=example_input, target=target,
                                              train_fn=train_fn, teacher=teacher))
    object.__setattr__(model, _REPORT, report)
    return model


def prune_report(model: nn.Module) -> Any:
    """What the last ``prune`` call on ``model`` did (``PruneReport``, ``StructuredReport``, ``TransformerReport``
    or ``ScheduleReport``)."""
    report = getattr(model, _REPORT, None)
    if report is None:
        raise ConfigError(f"prune_report: {type(model).__name__} was not pruned by deepshrink.prune")
    return report


def finalize(model: nn.Module) -> nn.Module:
    """Make pruning permanent: the masks go, the zeros stay; ``model`` is a plain module again."""
    detach_masks(model)
    return model


def prunable_weights(model: nn.Module, config: PruningConfig) -> dict[str, nn.Parameter]:
    """``{"<module>.weight": parameter}`` of the layers the config selects (the trained tensor:
    behind a mask, the original the mask reads).

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
    return {f"{n}.weight": raw_parameter(model, f"{n}.weight") for n in chosen}


def score_weights(
    model: nn.Module, weights: Mapping[str, nn.Parameter], config: PruningConfig, data: DataSplits | None = None,
    *, train_fn: TrainFn | None = None,
) -> dict[str, torch.Tensor]:
    """Run the criterion registered for ``type(config)``: one score per weight, higher = keep."""
    scores = _CRITERIA.handler_for(config)(model, weights, config, data, train_fn)
    for name, w in weights.items():
        if name not in scores or tuple(scores[name].shape) != tuple(w.shape):
            got = tuple(scores[name].shape) if name in scores else "nothing"
            raise ValueError(f"{type(config).__name__}: its criterion must score every weight of {name!r} "
                             f"(shape {tuple(w.shape)}), got {got}")
    return {n: scores[n].detach() for n in weights}


def rank_pruned_lowest(scores: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Already-pruned weights get -inf, so a higher sparsity prunes them first and counts them."""
    return {n: torch.where(previous[n], s.double(), float("-inf")) if n in previous else s for n, s in scores.items()}


def prune_weights(model: nn.Module, config: PruningConfig, *, data: DataSplits | None = None,
                  train_fn: TrainFn | None = None) -> PruneReport:
    """The unstructured step: score with ``config``'s criterion, choose masks, attach them."""
    if not isinstance(config, PruningConfig):
        raise ConfigError(f"prune: expected a PruningConfig criterion, got {type(config).__name__}")
    weights = prunable_weights(model, config)
    previous = get_masks(model)
    scores = rank_pruned_lowest(score_weights(model, weights, config, data, train_fn=train_fn), previous)
    # a learned sparsity (``sparsity: None``): the criterion's scores are > 0 for the weights it keeps
    masks = {n: s > 0 for n, s in scores.items()} if config.sparsity is None else choose_masks(scores, config)
    # a lower sparsity than before must not revive a weight: its value is already gone
    masks = {n: m & previous[n] if n in previous else m for n, m in masks.items()}
    attach_masks(model, masks)
    final = get_masks(model)
    return PruneReport({n[: -len(".weight")]: (int(final[n].sum()), final[n].numel()) for n in weights})


def _prune_by_scores(model: nn.Module, config: PruningConfig, call: PruneCall) -> PruneReport:
    return prune_weights(model, config, data=call.data, train_fn=call.train_fn)


@_register_scores(MagnitudePruning, name="magnitude")
def _magnitude(model, weights, config: MagnitudePruning, data, train_fn) -> dict[str, torch.Tensor]:
    return magnitude_scores(weights, config.norm)


def _batches(config: BatchScoredPruning, data: DataSplits | None):
    return train_batches(data, batches=config.batches, batch_size=config.batch_size, seed=config.seed, who=type(config).__name__)


@_register_scores(GradientPruning, name="gradient")
def _gradient(model, weights, config: GradientPruning, data, train_fn) -> dict[str, torch.Tensor]:
    return gradient_scores(model, weights, _batches(config, data))


@_register_scores(TaylorPruning, name="taylor")
def _taylor(model, weights, config: TaylorPruning, data, train_fn) -> dict[str, torch.Tensor]:
    return taylor_scores(model, weights, _batches(config, data))


@_register_scores(RandomPruning, name="random")
def _random(model, weights, config: RandomPruning, data, train_fn) -> dict[str, torch.Tensor]:
    return random_scores(weights, config.seed)
