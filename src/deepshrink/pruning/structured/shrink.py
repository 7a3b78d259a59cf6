"""Apply a channel plan: zero the removed channels (the masked reference), or cut them out.

``shrink_channels`` replaces every affected Conv/Linear/BatchNorm with a new, smaller module
holding the kept slices, so the result is an ordinary ``nn.Module``: smaller on disk, fewer
MACs, and exportable like any other. Its outputs equal those of ``mask_channels`` applied to the
original (every coupled slice of a removed channel zeroed), which is what the tests check.
"""
from __future__ import annotations

import copy

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from deepshrink.pruning.structured.graph import ChannelGraph, ChannelGroup, ParamSlice


@dataclass(frozen=True)
class ChannelPlan:
    """Which channel classes of ``graph`` go; every other class (fixed ones included) stays."""

    graph: ChannelGraph
    removed: frozenset[int]

    @classmethod
    def from_keep(cls, graph: ChannelGraph, groups: Sequence[ChannelGroup], keeps: Sequence[torch.Tensor]) -> "ChannelPlan":
        """``keeps[i][j]``: whether class ``groups[i].classes[j]`` stays."""
        removed = {c for g, keep in zip(groups, keeps) for c, k in zip(g.classes, keep.tolist()) if not k}
        return cls(graph, frozenset(removed))

    def kept(self, piece: ParamSlice) -> list[int]:
        return [i for i, e in enumerate(piece.elements) if self.graph.find(e) not in self.removed]

    def width(self, layer: str) -> int:
        """Output channels ``layer`` (a producer) keeps."""
        return sum(self.graph.find(e) not in self.removed for e in self.graph.producers[layer])


@torch.no_grad()
def mask_channels(model: nn.Module, plan: ChannelPlan) -> None:
    """Zero, in place, every weight, bias and BatchNorm affine slice of the removed channels."""
    for piece in plan.graph.slices:
        if piece.param not in ("weight", "bias"):
            continue
        tensor = getattr(model.get_submodule(piece.module), piece.param)
        kept = set(plan.kept(piece))
        gone = [i for i in range(len(piece.elements)) if i not in kept]
        if gone:
            tensor.index_fill_(piece.dim, torch.tensor(gone, dtype=torch.long), 0.0)


def shrink_channels(model: nn.Module, plan: ChannelPlan) -> dict[str, tuple[int, int]]:
    """Replace the affected layers with smaller ones; ``{layer: (out channels before, after)}``."""
    keep: dict[str, dict[tuple[str, int], list[int]]] = defaultdict(dict)
    for piece in plan.graph.slices:
        keep[piece.module][(piece.param, piece.dim)] = plan.kept(piece)
    changed: dict[str, tuple[int, int]] = {}
    for name, kept in keep.items():
        old = model.get_submodule(name)
        if all(len(idx) == getattr(old, param).shape[dim] for (param, dim), idx in kept.items()):
            continue
        base = next(kind for kind in _REBUILD if isinstance(old, kind))
        new = _REBUILD[base](old, kept, base)
        if type(old) is not base:
            new = _as_subclass(old, new)
        new.train(old.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        changed[name] = (_width(old), _width(new))
    return changed


def _width(module: nn.Module) -> int:
    return getattr(module, "out_channels", None) or getattr(module, "out_features", None) or module.num_features


def _index(kept: dict[tuple[str, int], list[int]], param: str, dim: int, size: int) -> torch.Tensor:
    return torch.tensor(kept.get((param, dim), range(size)), dtype=torch.long)


@torch.no_grad()
def _copy(target: nn.Parameter | torch.Tensor, source: torch.Tensor) -> None:
    target.copy_(source)


def _as_subclass(old: nn.Module, shrunk: nn.Module) -> nn.Module:
    """A copy of ``old`` (its class, its other attributes) with ``shrunk``'s tensors and widths: a
    subclass is rebuilt without calling its constructor, whose signature may differ from its base's."""
    new = copy.copy(old)
    new._parameters, new._buffers = dict(shrunk._parameters), dict(shrunk._buffers)
    for attr in _WIDTHS:
        if hasattr(shrunk, attr):
            setattr(new, attr, getattr(shrunk, attr))
    return new


_WIDTHS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")


def _conv(old: nn.modules.conv._ConvNd, kept, cls: type) -> nn.Module:
    out_idx = _index(kept, "weight", 0, old.out_channels)
    if old.groups == 1:
        in_idx = _index(kept, "weight", 1, old.in_channels)
        in_channels, groups = len(in_idx), 1
    else:  # depthwise: one input channel per group, ``multiplier`` outputs per input
        in_idx = torch.arange(old.weight.shape[1])
        multiplier = old.out_channels // old.in_channels
        in_channels = groups = len(out_idx) // multiplier
    new = cls(
        in_channels, len(out_idx), old.kernel_size, stride=old.stride, padding=old.padding, dilation=old.dilation,
        groups=groups, bias=old.bias is not None, padding_mode=old.padding_mode, device=old.weight.device, dtype=old.weight.dtype,
    )
    _copy(new.weight, old.weight.detach()[out_idx][:, in_idx])
    if old.bias is not None:
        _copy(new.bias, old.bias.detach()[out_idx])
    _keep_grad_flags(old, new)
    return new


def _linear(old: nn.Linear, kept, cls: type) -> nn.Module:
    out_idx = _index(kept, "weight", 0, old.out_features)
    in_idx = _index(kept, "weight", 1, old.in_features)
    new = cls(len(in_idx), len(out_idx), bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    _copy(new.weight, old.weight.detach()[out_idx][:, in_idx])
    if old.bias is not None:
        _copy(new.bias, old.bias.detach()[out_idx])
    _keep_grad_flags(old, new)
    return new


def _batch_norm(old: nn.modules.batchnorm._BatchNorm, kept, cls: type) -> nn.Module:
    idx = next(torch.tensor(v, dtype=torch.long) for (_, dim), v in kept.items() if dim == 0)
    reference = old.weight if old.weight is not None else old.running_mean
    new = cls(len(idx), eps=old.eps, momentum=old.momentum, affine=old.affine,
                    track_running_stats=old.track_running_stats, device=reference.device, dtype=reference.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(old, name, None) is not None:
            _copy(getattr(new, name), getattr(old, name).detach()[idx])
    if old.num_batches_tracked is not None:
        _copy(new.num_batches_tracked, old.num_batches_tracked)
    _keep_grad_flags(old, new)
    return new


def _keep_grad_flags(old: nn.Module, new: nn.Module) -> None:
    for name, param in new.named_parameters(recurse=False):
        param.requires_grad_(getattr(old, name).requires_grad)


_REBUILD: dict[type, Callable[[nn.Module, dict], nn.Module]] = {
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv, nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm,
}
