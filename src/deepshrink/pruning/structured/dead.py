"""Remove the channels (units) that unstructured pruning left with no effect.

After strong unstructured pruning, many hidden units lose every outgoing weight: whatever they
compute is multiplied by zero in every layer that reads them. Cutting them out is exact (the
outputs do not change at all), makes the model physically smaller and faster, and frees their
biases, which a sparse file would otherwise still store. A channel counts as dead when every
weight slice that *reads* it (the input dimension of the next Conv/Linear layers, across
flattens, concatenations and residual additions, as ``analyze_channels`` couples them) is zero;
channels the analysis cannot follow (the model's output, unsupported ops) always stay.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from deepshrink.core.masks import attach_masks, detach_masks
from deepshrink.pruning.structured.arch import record_widths
from deepshrink.pruning.structured.dependency import analyze_channels
from deepshrink.pruning.structured.graph import ChannelGraph, ChannelGroup
from deepshrink.pruning.structured.importance import WEIGHTED, _accumulate, _split, class_positions, per_index, slice_positions
from deepshrink.pruning.structured.shrink import ChannelPlan, shrink_channels


def live_channels(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup]) -> list[torch.Tensor]:
    """Per group, True for every channel that some reading weight still uses (or that no
    weight slice reads at all: then the analysis cannot prove it unused, so it stays)."""
    position = class_positions(graph, groups)
    used = torch.zeros(len(position), dtype=torch.float64)
    readers = torch.zeros(len(position), dtype=torch.float64)
    for piece in graph.slices:
        module = model.get_submodule(piece.module)
        if not (isinstance(module, WEIGHTED) and piece.param == "weight" and piece.dim == 1):
            continue
        positions = slice_positions(graph, piece, position)
        weight = module.weight.detach().double()
        _accumulate(used, positions, per_index((weight != 0).double(), piece.dim))
        _accumulate(readers, positions, torch.ones(weight.shape[piece.dim], dtype=torch.float64))
    return [(u > 0) | (r == 0) for u, r in zip(_split(used, groups), _split(readers, groups))]


@torch.no_grad()
def remove_dead_channels(model: nn.Module, example_input: torch.Tensor, *, multiple: int = 1) -> dict[str, tuple[int, int]]:
    """Cut every dead channel out of ``model`` in place; ``{layer: (width before, after)}`` for
    the layers that lost output channels (their readers shrink to match). ``multiple``: widths are rounded up to it (by keeping some dead
    channels, still exact), e.g. 8 for XNNPACK kernels. Every layer keeps at least one channel.
    Pruning masks on the model are carried over to the smaller layers, and a zoo model's
    architecture record gets the new widths (as ``ChannelPruning`` does)."""
    masks = detach_masks(model)
    graph = analyze_channels(model, example_input, warn=False)
    groups = graph.groups()
    keeps = []
    for group, live in zip(groups, live_channels(model, graph, groups)):
        alive = int(live.sum())
        count = min(group.size, max(multiple, math.ceil(alive / multiple) * multiple))
        keep = live.clone()
        keep[torch.nonzero(~live).reshape(-1)[: count - alive]] = True  # pad with dead channels: they change nothing
        keeps.append(keep)
    changed = {name: (before, after) for name, (before, after)
               in shrink_channels(model, ChannelPlan.from_keep(graph, groups, keeps)).items() if before != after}
    if changed:
        record_widths(model)  # a zoo model's checkpoint must rebuild the narrower skeleton (checked on plain names)
    if masks:
        params = dict(model.named_parameters())
        attach_masks(model, {name: params[name] != 0 for name in masks if name in params})
    return changed
