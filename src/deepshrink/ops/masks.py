"""Mask selection: given importance scores, pick which weights stay.

Scores are higher-is-more-important. Masks are boolean tensors of the scores' shapes, True = kept.
Selection is exact: ``round(sparsity * n)`` entries are pruned, ties broken by flat index so
the result is deterministic.
"""
from __future__ import annotations

from typing import Mapping

import torch

from deepshrink.core.errors import ConfigError


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity: {sparsity} is outside [0, 1); use e.g. 0.9 to prune 90 % of weights")


def _lowest_k_mask(flat_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask over a 1-D tensor that drops exactly the k lowest scores."""
    keep = torch.ones_like(flat_scores, dtype=torch.bool)
    if k > 0:
        # stable sort: equal scores are pruned in index order, the same on every run
        order = torch.sort(flat_scores.double(), stable=True).indices
        keep[order[:k]] = False
    return keep


def global_mask(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across all tensors: exactly ``round(sparsity * total)`` weights pruned."""
    _check_sparsity(sparsity)
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    keep = _lowest_k_mask(flat, round(sparsity * flat.numel()))
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[offset:offset + size].reshape(scores[n].shape)
        offset += size
    return out


def local_mask(scores: Mapping[str, torch.Tensor], sparsity: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Each tensor pruned to its own sparsity (one value for all, or one per name)."""
    out = {}
    for n, s in scores.items():
        target = sparsity[n] if isinstance(sparsity, Mapping) else sparsity
        _check_sparsity(target)
        flat = s.detach().reshape(-1).float()
        out[n] = _lowest_k_mask(flat, round(target * flat.numel())).reshape(s.shape)
    return out
