"""Importance of heads and neurons: one score per unit of every block, higher = keep.

A unit's score adds up what every slice coupled to it says (q/k/v rows and out-projection
columns of a head; up/gate rows and the down column of a neuron), as channel importance does for
channel groups. Criteria only score; how many units go is the handler's choice.

Taylor without labels: at the unpruned model any loss that compares the model with itself has
zero gradient, so the label-free loss is ``r . y`` for a Gaussian probe ``r`` drawn per batch.
For a unit, ``(sum of w * dL/dw)^2 = (r . dy)^2`` with ``dy`` the first-order change of the output
``y`` when the unit's weights are zeroed, and its mean over probes is ``|dy|^2``.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import ConfigError
from deepshrink.core.outputs import primary
from deepshrink.pruning.structured.attention import Block
from deepshrink.pruning.structured.heads import element_units

Batch = tuple[Any, "torch.Tensor | None"]   # (inputs, labels or None)


def _per_index(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1).sum(1)


def magnitude_unit_scores(model: nn.Module, blocks: Sequence[Block], norm: str = "l1") -> list[torch.Tensor]:
    """L1 (sum |w|) or L2 (sqrt of sum w^2) of every weight coupled to each unit (biases left out)."""
    power = 1 if norm == "l1" else 2
    out = []
    for block in blocks:
        total = torch.zeros(block.units, dtype=torch.float64)
        for (tensor, dim, units), piece in zip(element_units(model, block), block.slices):
            if piece.param.endswith("weight"):
                total.index_add_(0, units, _per_index(tensor.detach().double().abs().pow(power), dim))
        out.append(total if power == 1 else total.sqrt())
    return out


def taylor_unit_scores(model: nn.Module, blocks: Sequence[Block], batches: Iterable[Batch], *, seed: int = 0) -> list[torch.Tensor]:
    """Mean over batches of (sum over the unit's weights and biases of w * dL/dw)^2 (Molchanov et al.
    2019, group Taylor); L: cross-entropy with the labels when a batch has them, else the probe loss."""
    pieces = [element_units(model, block) for block in blocks]
    params = list({id(t): t for entries in pieces for t, _, _ in entries}.values())
    index = {id(p): i for i, p in enumerate(params)}
    totals = [torch.zeros(b.units, dtype=torch.float64) for b in blocks]
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # dropout would make scores depend on the draw
    count = 0
    try:
        for inputs, labels in batches:
            output = primary(S.call(model, inputs))
            grads = torch.autograd.grad(unit_loss(output, labels, generator), params, allow_unused=True)
            for total, entries in zip(totals, pieces):
                first_order = torch.zeros_like(total)
                for tensor, dim, units in entries:
                    grad = grads[index[id(tensor)]]
                    if grad is not None:
                        first_order.index_add_(0, units, _per_index(tensor.detach().double() * grad.double(), dim))
                total += first_order.square()
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("TransformerPruning.importance: 'taylor' got no batch (data.train is empty)")
    return [t / count for t in totals]


def unit_loss(output: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy for labelled logits ``[batch, classes]``, else ``sum(r * output)``, ``r`` ~ N(0, 1)."""
    if labels is not None and output.dim() == 2 and labels.dim() == 1 and bool((labels >= 0).all()):
        return F.cross_entropy(output, labels)
    probe = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output.dtype)
    return (probe * output).sum()


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores (ties: the lower index first), ascending."""
    order = torch.sort(scores, stable=True).indices[:count]
    return sorted(int(i) for i in order)
