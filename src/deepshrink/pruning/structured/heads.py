"""Apply a choice of heads / neurons: zero the removed units (the reference), or cut them out.

``mask_units`` zeroes, in place, every slice coupled to the removed units (q/k/v rows and their
biases, the out-projection's columns; the FFN's up and gate rows, the down-projection's columns).
``shrink_units`` makes the layers narrower instead: the result computes what the masked model
computes (a removed head's context or a removed neuron's activation no longer reaches the
output, which is all the masking changes), and is an ordinary module that exports like any other.
Head counts on the attention module (``num_attention_heads`` / ``num_heads``, ``all_head_size``)
follow; ``nn.MultiheadAttention`` is replaced by ``mha.PrunedMultiheadAttention``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.pruning.structured.attention import Block
from deepshrink.pruning.structured.mha import PrunedMultiheadAttention

_HEAD_COUNTS = ("num_attention_heads", "num_heads")
_HEAD_WIDTHS = ("all_head_size",)


def element_units(model: nn.Module, block: Block) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """``(tensor, dim, unit of every index along dim)`` for each slice of ``block``."""
    out = []
    for piece in block.slices:
        tensor = getattr(model.get_submodule(piece.module), piece.param)
        out.append((tensor, piece.dim, piece.unit_of(tensor.shape[piece.dim])))
    return out


@torch.no_grad()
def mask_units(model: nn.Module, block: Block, removed: Sequence[int]) -> None:
    """Zero every weight and bias slice of ``removed`` units of ``block``, in place."""
    gone = torch.tensor(list(removed), dtype=torch.long)
    for tensor, dim, units in element_units(model, block):
        tensor.index_fill_(dim, torch.isin(units, gone).nonzero().flatten(), 0.0)


def shrink_units(model: nn.Module, block: Block, keep: Sequence[int]) -> None:
    """Keep only units ``keep`` (ascending, original numbering) of ``block``; the layers get narrower."""
    keep = sorted(int(k) for k in keep)
    if len(keep) == block.units:
        return
    if not keep:
        raise ConfigError(f"{block.name}: cannot remove every {'head' if block.kind == 'heads' else 'neuron'}")
    {"projections": _shrink_projections, "mha": _shrink_mha, "ffn": _shrink_ffn}[block.convention](model, block, keep)


def unit_rows(keep: Sequence[int], size: int) -> torch.Tensor:
    """Indices of units ``keep``, each ``size`` consecutive elements."""
    return torch.tensor([u * size + i for u in keep for i in range(size)], dtype=torch.long)


@torch.no_grad()
def narrow_linear(linear: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep output ``rows`` and input ``cols`` of ``linear`` in place (its class, hooks and attributes stay)."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    linear.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None and rows is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def _shrink_projections(model: nn.Module, block: Block, keep: list[int]) -> None:
    rows = unit_rows(keep, block.unit_size)
    for role in ("query", "key", "value"):
        narrow_linear(model.get_submodule(block.roles[role]), rows=rows)
    narrow_linear(model.get_submodule(block.roles["output"]), cols=rows)
    module = model.get_submodule(block.name)
    for attr in _HEAD_COUNTS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, len(keep))
    for attr in _HEAD_WIDTHS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, len(keep) * block.unit_size)
    if isinstance(module, PrunedMultiheadAttention):   # pruned before: keep numbering the original heads
        module.kept_heads = tuple(module.kept_heads[k] for k in keep)


def _shrink_mha(model: nn.Module, block: Block, keep: list[int]) -> None:
    if not block.name:
        raise ConfigError("TransformerPruning: the model is itself an nn.MultiheadAttention; wrap it in a module "
                          "so that its pruned replacement has a parent to live in")
    parent, _, child = block.name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, PrunedMultiheadAttention(model.get_submodule(block.name), keep))


def _shrink_ffn(model: nn.Module, block: Block, keep: list[int]) -> None:
    rows = torch.tensor(keep, dtype=torch.long)
    for role in ("up", "gate"):
        if role in block.roles:
            narrow_linear(model.get_submodule(block.roles[role]), rows=rows)
    narrow_linear(model.get_submodule(block.roles["down"]), cols=rows)
