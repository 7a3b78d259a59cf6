"""``prune(model, TransformerPruning(...))``: find, score, choose, measure, shrink heads and neurons.

The steps stay separate functions: ``attention.find_blocks`` / ``select_blocks`` (which blocks, by
convention), ``unit_scores`` (importance), ``removal_counts`` / ``choose_units`` (how many go, which),
``block_sensitivity`` (the output change when one block alone is pruned, measured by masking) and
``heads.shrink_units`` (narrower layers). ``heads.mask_units`` applies the same choice as zeros,
the reference a shrunk model must match.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Iterator

import torch
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import has_masks
from deepshrink.core.outputs import primary
from deepshrink.core.targets import get_target
from deepshrink.data.splits import DataSplits
from deepshrink.pruning.api import PRUNERS, PruneCall
from deepshrink.pruning.structured.api import ShrinkError
from deepshrink.pruning.structured.attention import Block, find_blocks, select_blocks
from deepshrink.pruning.structured.configs import TransformerPruning
from deepshrink.pruning.structured.heads import element_units, mask_units, shrink_units
from deepshrink.pruning.structured.unit_scores import lowest, magnitude_unit_scores, taylor_unit_scores
from deepshrink.pruning.structured.widths import round_channels


@dataclass
class TransformerReport:
    """What a ``TransformerPruning`` changed. ``heads`` / ``neurons``: per attention / feed-forward
    block, units (before, after); ``removed``: the removed units' original indices per block;
    ``params_before`` / ``params_after``: the model's parameters; ``sensitivity``: per block, the
    first output's change on the example input with that block alone pruned (``sqnr_db``,
    ``cosine``); ``fidelity``: the same with every block pruned (None without an example input)."""

    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    neurons: dict[str, tuple[int, int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    fidelity: dict[str, float] | None = None
    conventions: dict[str, str] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of the model's parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    def describe(self) -> str:
        """One line: ``heads 4->3 in 2 blocks, FFN neurons 128->64 in 2 blocks; params 143,552 -> 118,752 (17.3 % fewer)``."""
        def widths(units: dict[str, tuple[int, int]], what: str) -> list[str]:
            pairs: dict[tuple[int, int], int] = {}
            for pair in units.values():
                pairs[pair] = pairs.get(pair, 0) + 1
            return [f"{what} {b}->{a} in {n} block{'s' if n > 1 else ''}" for (b, a), n in pairs.items()]
        parts = widths(self.heads, "heads") + widths(self.neurons, "FFN neurons")
        return (f"{', '.join(parts) or 'nothing removed'}; params {self.params_before:,} -> {self.params_after:,} "
                f"({100 * self.sparsity:.1f} % fewer)")

    def as_dict(self) -> dict:
        return {**asdict(self), "heads": {n: {"before": b, "after": a} for n, (b, a) in self.heads.items()},
                "neurons": {n: {"before": b, "after": a} for n, (b, a) in self.neurons.items()}, "sparsity": self.sparsity}


@PRUNERS.register(TransformerPruning, name="transformer")
def _transformer(model: nn.Module, config: TransformerPruning, call: PruneCall) -> TransformerReport:
    example = call.example_input
    if example is None and call.data is not None:
        example = call.data.example_batch(8)
    return prune_transformer(model, config, example_input=example, data=call.data, target=call.target)


def prune_transformer(model: nn.Module, config: TransformerPruning, *, example_input: Any = None,
                      data: DataSplits | None = None, target: str = "xnnpack") -> TransformerReport:
    """Remove heads and feed-forward neurons of ``model`` in place; the model ends physically smaller.

    ``example_input``: a batch the model is called with (``core.samples``: a tensor, tuple or dict):
    sensitivity and fidelity are measured on it and the shrunk model must run on it; without one
    (and without ``data``) both are skipped. ``data``: batches for ``importance="taylor"``.
    """
    if not isinstance(config, TransformerPruning):
        raise ConfigError(f"prune: expected a TransformerPruning config, got {type(config).__name__}")
    if has_masks(model):
        raise ConfigError("TransformerPruning: the model carries unstructured pruning masks; call deepshrink.finalize(model) first")
    blocks = select_blocks(model, find_blocks(model), config.layers, config.skip)
    removed = choose_units(model, blocks, config, data=data, example_input=example_input, target=target)
    report = TransformerReport(params_before=_parameters(model), conventions={b.name: b.convention for b in blocks})
    reference = None
    if example_input is not None:
        reference = _first_output(model, example_input)
        if config.block_sensitivity:
            report.sensitivity = {b.name: {"removed": len(r), **_masked_change(model, [(b, r)], example_input, reference)}
                                  for b, r in zip(blocks, removed) if r}
    for block, gone in zip(blocks, removed):
        shrink_units(model, block, [u for u in range(block.units) if u not in set(gone)])
        (report.heads if block.kind == "heads" else report.neurons)[block.name] = (block.units, block.units - len(gone))
        report.removed[block.name] = list(gone)
    report.params_after = _parameters(model)
    if reference is not None:
        try:
            report.fidelity = output_change(reference, _first_output(model, example_input))
        except Exception as err:
            raise ShrinkError(f"TransformerPruning: the pruned {type(model).__name__} no longer runs ({type(err).__name__}: "
                              f"{err}); its attention forward may reshape with a width pruning does not update — "
                              f"skip the block (skip=...) and report the model") from err
    return report


def removal_counts(blocks: list[Block], config: TransformerPruning, multiple: int) -> list[int]:
    """Units each block loses: ``config.heads`` of every attention block, ``config.ffn`` of every feed-forward."""
    counts = []
    for block in blocks:
        if block.kind == "neurons":
            counts.append(block.units - round_channels(block.units * (1.0 - config.ffn), block.units, multiple))
        elif isinstance(config.heads, int):
            if config.heads >= block.units:
                raise ConfigError(f"TransformerPruning.heads: {config.heads} would remove every head of {block.name} "
                                  f"({block.units} heads); at most {block.units - 1}, or skip the block")
            counts.append(config.heads)
        else:
            counts.append(min(block.units - 1, math.floor(config.heads * block.units + 0.5)))
    return counts


def choose_units(model: nn.Module, blocks: list[Block], config: TransformerPruning, *, data: DataSplits | None = None,
                 example_input: Any = None, target: str = "xnnpack") -> list[list[int]]:
    """Per block, the units to remove: the lowest-scored ones, as many as ``removal_counts`` says."""
    counts = removal_counts(blocks, config, config.round_to or get_target(target).channel_multiple)
    return [lowest(s, n) for s, n in zip(unit_scores(model, blocks, config, data=data, example_input=example_input), counts)]


def unit_scores(model: nn.Module, blocks: list[Block], config: TransformerPruning, *, data: DataSplits | None = None,
                example_input: Any = None) -> list[torch.Tensor]:
    """One score per unit of each block by ``config.importance`` (higher = keep)."""
    if config.importance in ("l1", "l2"):
        return magnitude_unit_scores(model, blocks, config.importance)
    return taylor_unit_scores(model, blocks, _taylor_batches(config, data, example_input), seed=config.seed)


def _taylor_batches(config: TransformerPruning, data: DataSplits | None, example_input: Any) -> list:
    if data is not None:
        loader = data.loader("train", batch_size=config.batch_size, shuffle=True, seed=config.seed)
        return [(x, y if data.labelled else None) for x, y in islice(loader, config.batches)]
    if example_input is not None:
        return [(example_input, None)] * config.batches
    raise ConfigError(f"TransformerPruning.importance: 'taylor' needs data (it averages gradients over {config.batches} "
                      "batches of data.train) or an example_input; pass one to prune(...), or use 'l1', which needs none")


def block_sensitivity(model: nn.Module, config: TransformerPruning, example_input: Any, *, data: DataSplits | None = None,
                      target: str = "xnnpack") -> dict[str, dict[str, float]]:
    """Per selected block, the first output's change on ``example_input`` when that block alone loses
    the units ``config`` would remove (by masking; ``model`` is left as it was)."""
    blocks = select_blocks(model, find_blocks(model), config.layers, config.skip)
    removed = choose_units(model, blocks, config, data=data, example_input=example_input, target=target)
    reference = _first_output(model, example_input)
    return {b.name: {"removed": len(r), **_masked_change(model, [(b, r)], example_input, reference)}
            for b, r in zip(blocks, removed)}


def output_change(reference: torch.Tensor, produced: torch.Tensor) -> dict[str, float]:
    """SQNR (dB; inf when equal) and cosine similarity of ``produced`` against ``reference``."""
    ref, out = reference.detach().double().flatten(), produced.detach().double().flatten()
    noise = float((ref - out).square().sum())
    sqnr = math.inf if noise == 0.0 else 10.0 * math.log10(float(ref.square().sum()) / noise)
    cosine = float(torch.nn.functional.cosine_similarity(ref, out, dim=0))
    return {"sqnr_db": sqnr, "cosine": cosine}


def _masked_change(model: nn.Module, choice: list[tuple[Block, list[int]]], example_input: Any,
                   reference: torch.Tensor) -> dict[str, float]:
    with _masked(model, choice):
        return output_change(reference, _first_output(model, example_input))


@contextlib.contextmanager
def _masked(model: nn.Module, choice: list[tuple[Block, list[int]]]) -> Iterator[None]:
    saved = [(t, t.detach().clone()) for block, _ in choice for t, _, _ in element_units(model, block)]
    try:
        for block, gone in choice:
            mask_units(model, block, gone)
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


@torch.no_grad()
def _first_output(model: nn.Module, example_input: Any) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return primary(S.call(model, example_input)).detach().clone()
    finally:
        model.train(was_training)


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
