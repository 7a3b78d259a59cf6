"""``nn.MultiheadAttention`` with heads removed: what head pruning puts in its place.

``nn.MultiheadAttention`` cannot hold fewer heads than ``embed_dim / head_dim``: its forward derives
the head size from the query's width. ``PrunedMultiheadAttention`` keeps the kept heads' rows of
the q/k/v projections as three Linear layers and the out-projection's matching columns, and
computes what ``nn.MultiheadAttention`` computes with the removed heads' outputs zeroed. Its
``forward`` takes the same arguments, so ``nn.TransformerEncoderLayer`` and user code call it
unchanged (``_qkv_same_embed_dim`` is False: the fused fast path of ``nn.TransformerEncoderLayer``
needs the packed original). Per-head 3-D ``attn_mask`` rows of the removed heads are dropped;
averaged attention weights average over the kept heads.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention of ``len(kept_heads)`` heads of ``head_dim`` over ``embed_dim``-wide inputs."""

    def __init__(self, source: nn.MultiheadAttention, keep: Sequence[int]) -> None:
        super().__init__()
        size, embed = source.head_dim, source.embed_dim
        rows = torch.tensor([h * size + i for h in keep for i in range(size)], dtype=torch.long)
        if source._qkv_same_embed_dim:
            weights = source.in_proj_weight.detach().chunk(3)
        else:
            weights = (source.q_proj_weight.detach(), source.k_proj_weight.detach(), source.v_proj_weight.detach())
        biases = source.in_proj_bias.detach().chunk(3) if source.in_proj_bias is not None else (None,) * 3
        self.q_proj, self.k_proj, self.v_proj = (_linear(w[rows], None if b is None else b[rows]) for w, b in zip(weights, biases))
        out = source.out_proj
        self.out_proj = _linear(out.weight.detach()[:, rows], None if out.bias is None else out.bias.detach())
        self.num_heads, self.head_dim, self.embed_dim = len(keep), size, embed
        self.kept_heads, self.source_heads = tuple(int(h) for h in keep), source.num_heads
        self.batch_first, self.dropout = source.batch_first, source.dropout
        # read by nn.TransformerEncoderLayer / nn.TransformerEncoder to decline their fused fast path
        self._qkv_same_embed_dim = False
        self.in_proj_weight = self.in_proj_bias = None
        self.train(source.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]

        def split(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(query), target), split(self.k_proj(key), source), split(self.v_proj(value), source)
        scores = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-2, -1))
        scores = scores + self._additive_mask(attn_mask, key_padding_mask, is_causal, batch, target, source, scores)
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout)
        context = torch.matmul(weights, v).transpose(1, 2).reshape(batch, target, self.num_heads * self.head_dim)
        out = self.out_proj(context)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights.squeeze(0) if unbatched else weights

    def _additive_mask(self, attn_mask, key_padding_mask, is_causal, batch, target, source, like):
        mask = torch.zeros((), dtype=like.dtype, device=like.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(target, source, dtype=torch.bool, device=like.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:   # one [target, source] mask per (sample, original head)
                attn_mask = attn_mask.view(batch, self.source_heads, target, source)[:, list(self.kept_heads)]
            mask = mask + _as_additive(attn_mask, like)
        if key_padding_mask is not None:
            mask = mask + _as_additive(key_padding_mask, like).view(batch, 1, 1, source)
        return mask


def _as_additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: not attended) as 0 / -inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)
