"""Mask selection: given importance scores, pick which weights stay.

Scores are higher-is-more-important. Masks are boolean tensors of the scores' shapes, True = kept.
Selection is exact: ``round(sparsity * n)`` entries (or blocks) are pruned, ties broken by
index so the result is deterministic.

Three patterns:

- element: any weight may go (``Block(1, 1)``);
- block ``RxC``: whole blocks of R output channels x C input channels go together, a block
  scored by the sum of its scores (sparsity is exact in blocks: ``round(sparsity * blocks)``);
- ``N:M``: in every run of M consecutive input channels, the N highest scores stay.

Weights are laid out ``[out, in, *kernel]`` (Linear and Conv). Block and N:M groups run along the
input channels at one kernel position, the layout sparse kernels (NVIDIA 2:4, XNNPACK's 1x4
sparse GEMM) vectorize, so a group never straddles two kernel taps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from deepshrink.core.errors import ConfigError


@dataclass(frozen=True)
class Block:
    """Prune whole ``rows x cols`` blocks (output x input channels); ``Block(1, 1)`` is element-wise."""

    rows: int = 1
    cols: int = 1


@dataclass(frozen=True)
class NM:
    """Keep the ``n`` highest of every ``m`` consecutive input-channel weights."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m


ELEMENT = Block(1, 1)
_NM = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")
_BLOCK = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def parse_pattern(text: str | int) -> Block | NM:
    """``"element"`` -> ``Block(1, 1)``, ``"2:4"`` -> ``NM(2, 4)``, ``"1x4"`` -> ``Block(1, 4)``."""
    if isinstance(text, int) and not isinstance(text, bool):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124; say so instead of "not a string"
        if text >= 60:
            n, m = divmod(text, 60)
            raise ConfigError(f"pattern: got the number {text}: YAML reads an unquoted {n}:{m} as a base-60 number; quote it: pattern: '{n}:{m}'")
        raise ConfigError(f"pattern: got the number {text}; use 'element', 'N:M' such as '2:4', or a block 'RxC' such as '1x4'")
    if text == "element":
        return ELEMENT
    if match := _NM.fullmatch(text):
        n, m = int(match[1]), int(match[2])
        if n > m:
            raise ConfigError(f"pattern: {n}:{m} has N > M; N:M keeps the N highest of every M weights, so N <= M, e.g. '2:4'")
        if n < 1:
            raise ConfigError(f"pattern: {n}:{m} keeps no weight; N must be at least 1, e.g. '2:4'")
        return NM(n, m)
    if match := _BLOCK.fullmatch(text):
        rows, cols = int(match[1]), int(match[2])
        if rows < 1 or cols < 1:
            raise ConfigError(f"pattern: block {rows}x{cols} is empty; both sides must be >= 1, e.g. '1x4'")
        return Block(rows, cols)
    raise ConfigError(f"pattern: {text!r} is not a pattern; use 'element', 'N:M' such as '2:4', or a block 'RxC' such as '1x4'")


def check_fits(name: str, shape: tuple[int, ...] | torch.Size, pattern: Block | NM) -> None:
    """ConfigError naming the layer when ``pattern``'s groups do not tile a weight of ``shape``."""
    if pattern == ELEMENT:
        return
    shape = tuple(shape)
    label = f"{pattern.n}:{pattern.m}" if isinstance(pattern, NM) else f"block {pattern.rows}x{pattern.cols}"
    fix = "choose a pattern that divides it, or leave the layer out of `layers`"
    if len(shape) < 2:
        raise ConfigError(f"pattern: {label} needs a weight with output and input channels; {name!r} has shape {shape}; {fix}")
    out_channels, in_channels = shape[0], shape[1]
    if isinstance(pattern, NM):
        if in_channels % pattern.m:
            raise ConfigError(f"pattern: {label} does not fit {name!r} with weight shape {shape}: "
                              f"{in_channels} input channels are not a multiple of {pattern.m}; {fix}")
        return
    if out_channels % pattern.rows or in_channels % pattern.cols:
        raise ConfigError(f"pattern: {label} does not fit {name!r} with weight shape {shape}: "
                          f"blocks need output channels divisible by {pattern.rows} and input channels by {pattern.cols}; {fix}")


def input_last(t: torch.Tensor) -> torch.Tensor:
    """``[out, in, *kernel]`` -> ``[out, prod(kernel) * in]`` with input channels innermost."""
    if t.dim() == 2:
        return t
    return t.permute(0, *range(2, t.dim()), 1).reshape(t.shape[0], -1)


def from_input_last(rows: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``input_last`` for a weight of ``shape``."""
    shape = tuple(shape)
    if len(shape) == 2:
        return rows.reshape(shape)
    kernel = shape[2:]
    return rows.reshape(shape[0], *kernel, shape[1]).permute(0, len(shape) - 1, *range(1, len(shape) - 1))


def block_scores(scores: torch.Tensor, block: Block) -> torch.Tensor:
    """Sum of ``scores`` over each block: ``[out / rows, prod(kernel) * in / cols]``."""
    check_fits("scores", scores.shape, block)
    if block == ELEMENT:
        return scores.reshape(-1).double()
    rows = input_last(scores.double())
    out, width = rows.shape
    return rows.reshape(out // block.rows, block.rows, width // block.cols, block.cols).sum(dim=(1, 3))


def expand_blocks(block_keep: torch.Tensor, shape: tuple[int, ...] | torch.Size, block: Block) -> torch.Tensor:
    """A per-block keep-mask spread back onto every weight of ``shape``."""
    if block == ELEMENT:
        return block_keep.reshape(shape)
    rows = block_keep.reshape(shape[0] // block.rows, -1).repeat_interleave(block.rows, 0).repeat_interleave(block.cols, 1)
    return from_input_last(rows, shape)


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


def global_mask(scores: Mapping[str, torch.Tensor], sparsity: float, *, block: Block = ELEMENT) -> dict[str, torch.Tensor]:
    """One threshold across all tensors: exactly ``round(sparsity * total)`` weights (or blocks) pruned."""
    _check_sparsity(sparsity)
    names = list(scores)
    if not names:
        return {}
    for n in names:
        check_fits(n, scores[n].shape, block)
    per_block = {n: block_scores(scores[n].detach(), block) for n in names}
    flat = torch.cat([per_block[n].reshape(-1) for n in names])
    keep = _lowest_k_mask(flat, round(sparsity * flat.numel()))
    out, offset = {}, 0
    for n in names:
        size = per_block[n].numel()
        out[n] = expand_blocks(keep[offset:offset + size], scores[n].shape, block)
        offset += size
    return out


def local_mask(
    scores: Mapping[str, torch.Tensor], sparsity: float | Mapping[str, float], *, block: Block = ELEMENT,
) -> dict[str, torch.Tensor]:
    """Each tensor pruned to its own sparsity (one value for all, or one per name)."""
    out = {}
    for n, s in scores.items():
        target = sparsity[n] if isinstance(sparsity, Mapping) else sparsity
        _check_sparsity(target)
        check_fits(n, s.shape, block)
        flat = block_scores(s.detach(), block).reshape(-1)
        out[n] = expand_blocks(_lowest_k_mask(flat, round(target * flat.numel())), s.shape, block)
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` True in every run of ``m`` consecutive input channels."""
    check_fits("scores", scores.shape, NM(n, m))
    groups = input_last(scores.detach().double()).reshape(-1, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    # stable ascending sort: the m - n lowest go, ties pruned in index order
    lowest = torch.sort(groups, dim=1, stable=True).indices[:, : m - n]
    keep.scatter_(1, lowest, False)
    return from_input_last(keep.reshape(scores.shape[0], -1), scores.shape)
