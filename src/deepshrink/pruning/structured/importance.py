"""Channel importance: one score per channel class of every group, higher = keep.

A class's score adds up what every coupled slice says about it (the producer's output row, each
consumer's input columns — H*W of them behind a flatten —, depthwise filters, BatchNorm scales),
so a channel that feeds three layers is judged by all three. Criteria only score; choosing how
many channels stay is ``widths``' job.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.data.splits import DataSplits
from deepshrink.pruning.structured.graph import ChannelGraph, ChannelGroup, ParamSlice

WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
NORMS = (nn.modules.batchnorm._BatchNorm,)
Batch = tuple[torch.Tensor, torch.Tensor]


def class_positions(graph: ChannelGraph, groups: Iterable[ChannelGroup]) -> dict[int, int]:
    """Class -> position in the concatenation of all groups' classes."""
    position: dict[int, int] = {}
    for group in groups:
        for cls in group.classes:
            position[cls] = len(position)
    return position


def slice_positions(graph: ChannelGraph, piece: ParamSlice, position: dict[int, int]) -> torch.Tensor:
    """Position of the class of every index of ``piece`` (-1: a fixed class)."""
    return torch.tensor([position.get(graph.find(e), -1) for e in piece.elements], dtype=torch.long)


def per_index(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dimension but ``dim``: shape ``[tensor.shape[dim]]``."""
    return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1).sum(1)


def _accumulate(total: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    valid = positions >= 0
    total.index_add_(0, positions[valid], values[valid].to(total.dtype))


def _split(total: torch.Tensor, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    return list(total.split([g.size for g in groups]))


def _slices(model: nn.Module, graph: ChannelGraph, kinds: tuple[type, ...], params: tuple[str, ...]):
    for piece in graph.slices:
        module = model.get_submodule(piece.module)
        if isinstance(module, kinds) and piece.param in params:
            yield piece, getattr(module, piece.param)


def magnitude_scores(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup], norm: str = "l1") -> list[torch.Tensor]:
    """L1 (sum |w|) or L2 (sqrt of sum w^2) of all Conv/Linear weight slices coupled to each class."""
    position = class_positions(graph, groups)
    total = torch.zeros(len(position), dtype=torch.float64)
    power = 1 if norm == "l1" else 2
    for piece, weight in _slices(model, graph, WEIGHTED, ("weight",)):
        _accumulate(total, slice_positions(graph, piece, position), per_index(weight.detach().double().abs().pow(power), piece.dim))
    return _split(total if power == 1 else total.sqrt(), groups)


def bn_scale_scores(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Sum of |gamma| of the BatchNorms coupled to each class (Liu et al. 2017, network slimming)."""
    position = class_positions(graph, groups)
    total = torch.zeros(len(position), dtype=torch.float64)
    covered = torch.zeros(len(position), dtype=torch.float64)
    for piece, gamma in _slices(model, graph, NORMS, ("weight",)):
        positions = slice_positions(graph, piece, position)
        _accumulate(total, positions, gamma.detach().double().abs())
        _accumulate(covered, positions, torch.ones(len(positions), dtype=torch.float64))
    for group, seen in zip(groups, _split(covered, groups)):
        if bool((seen == 0).any()):
            raise ConfigError(f"ChannelPruning.importance: 'bn_scale' needs a BatchNorm after every pruned layer, and "
                              f"group {group.name} has none; skip it (skip=({group.layers[0]!r},)) or use 'l1'")
    return _split(total, groups)


def taylor_scores(
    model: nn.Module,
    graph: ChannelGraph,
    groups: list[ChannelGroup],
    batches: Iterable[Batch],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> list[torch.Tensor]:
    """Mean over batches of (sum over the coupled weights, biases and BN affines of w * dL/dw)^2.

    Removing a channel zeroes all of its coupled slices at once, so their first-order terms add
    up before squaring (Molchanov et al. 2019, group Taylor).
    """
    position = class_positions(graph, groups)
    pieces = list(_slices(model, graph, WEIGHTED + NORMS, ("weight", "bias")))
    positions = [slice_positions(graph, piece, position) for piece, _ in pieces]
    params = list({id(p): p for _, p in pieces}.values())
    index = {id(p): i for i, p in enumerate(params)}
    total = torch.zeros(len(position), dtype=torch.float64)
    was_training = model.training
    model.eval()  # batch statistics and dropout would make scores depend on the draw
    count = 0
    try:
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
            first_order = torch.zeros(len(position), dtype=torch.float64)
            for (piece, param), where in zip(pieces, positions):
                grad = grads[index[id(param)]]
                if grad is not None:
                    _accumulate(first_order, where, per_index(param.detach().double() * grad.double(), piece.dim))
            total += first_order.square()
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("data.train: is empty; 'taylor' importance needs at least one batch")
    return _split(total / count, groups)


def train_batches(data: DataSplits | None, *, batches: int, batch_size: int, seed: int) -> list[Batch]:
    if data is None:
        raise ConfigError(f"ChannelPruning.importance: 'taylor' needs data (it averages gradients over {batches} batches of "
                          f"data.train); call prune(model, ChannelPruning(...), data=splits), or use 'l1', which needs none")
    return list(islice(data.loader("train", batch_size=batch_size, shuffle=True, seed=seed), batches))
