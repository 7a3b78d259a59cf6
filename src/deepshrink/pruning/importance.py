"""Importance criteria: each returns one score per weight, higher = more important.

A criterion is a small function ``(...) -> {name: scores}`` with each score tensor shaped like
its weight; scoring, selecting (``ops.masks``) and applying (``core.masks``) are separate steps,
so a criterion never decides how many weights go or in what pattern.

Adding a criterion takes one config class and one handler::

    from dataclasses import dataclass
    from deepshrink.pruning import PruningConfig, register_criterion

    @dataclass(frozen=True)
    class SignedMagnitudePruning(PruningConfig):   # its fields are its options
        keep_negative: bool = True

    @register_criterion(SignedMagnitudePruning)
    def _signed(model, weights, config, data):      # weights: {"<module>.weight": Parameter}
        return {n: w.detach() if config.keep_negative else -w.detach() for n, w in weights.items()}

    prune(model, SignedMagnitudePruning(sparsity=0.8))  # scope, groups, pattern all work

Criteria that need data take ``data`` (a ``DataSplits``, may be None) and should raise a
``ConfigError`` when it is missing (see ``train_batches``).
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.data.splits import DataSplits

Batch = tuple[torch.Tensor, torch.Tensor]


def magnitude_scores(weights: Mapping[str, torch.Tensor], norm: str = "l1") -> dict[str, torch.Tensor]:
    power = 1 if norm == "l1" else 2
    return {n: w.detach().abs().pow(power) for n, w in weights.items()}


def random_scores(weights: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores from one generator walked in ``weights`` order: the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}


def train_batches(data: DataSplits | None, *, batches: int, batch_size: int, seed: int, who: str) -> list[Batch]:
    """The first ``batches`` shuffled batches of ``data.train``; ConfigError if there is no data."""
    if data is None:
        raise ConfigError(f"{who}: needs data to score weights (averages over {batches} batches of data.train); "
                          f"call prune(model, config, data=splits), or use MagnitudePruning, which needs none")
    loader = data.loader("train", batch_size=batch_size, shuffle=True, seed=seed)
    return list(islice(loader, batches))


def _mean_over_batches(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    batches: Iterable[Batch],
    statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    names = list(weights)
    params = [weights[n] for n in names]
    totals = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    was_training = model.training
    model.eval()  # dropout / batch-norm batch statistics would make scores depend on the draw
    count = 0
    try:
        for x, y in batches:
            # autograd.grad leaves every .grad untouched, so scoring never disturbs a training run
            grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
            for total, p, g in zip(totals, params, grads):
                if g is not None:
                    total.add_(statistic(p.detach().double(), g.double()))
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("data.train: is empty; gradient-based criteria need at least one batch")
    return {n: (t / count).to(weights[n].dtype) for n, t in zip(names, totals)}


def gradient_scores(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    batches: Iterable[Batch],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Mean over batches of ``|dL_b/dw|``.

    The absolute value is taken per batch, before averaging: a weight whose gradient points
    different ways on different batches still matters to each of them.
    """
    return _mean_over_batches(model, weights, batches, lambda w, g: g.abs(), loss_fn)


def taylor_scores(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    batches: Iterable[Batch],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Mean over batches of ``|w * dL_b/dw|``: the first-order estimate of the loss change when
    ``w`` is set to zero (Molchanov et al. 2019), per batch then averaged as in ``gradient_scores``."""
    return _mean_over_batches(model, weights, batches, lambda w, g: (w * g).abs(), loss_fn)
