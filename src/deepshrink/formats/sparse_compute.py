"""Sparse compute where it really pays: per Linear layer, measured, not assumed.

A CSR matrix-vector product skips the zeros but pays for index reads and irregular access; on
this CPU at batch 1 it beats a dense GEMV only at high sparsity (our measurement: from ~95 %
for a 300x784 layer in torch's CSR kernels). So each candidate layer is timed both ways on its
real input shape, and it runs sparse only if that is faster by ``min_speedup``. Convolutions
stay dense: their sparse kernels are not faster at these sizes. The decisions are returned so
a report can show them.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.timing import time_calls


class CsrLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as CSR (``crow``/``col``/``values`` buffers)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            csr = weight.detach().to_sparse_csr()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("crow", csr.crow_indices())
        self.register_buffer("col", csr.col_indices())
        self.register_buffer("values", csr.values())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._csr = csr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(self._csr, x.reshape(-1, self.in_features).t()).t()
        return y if self.bias is None else y + self.bias

    def to_dense_linear(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self._csr.to_dense())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


@dataclass(frozen=True)
class LayerDecision:
    layer: str
    sparsity: float
    dense_us: float
    sparse_us: float
    runs_sparse: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _median_us(fn, x: torch.Tensor, runs: int) -> float:
    return 1e3 * statistics.median(time_calls([lambda: fn(x)], runs=runs, warmup=max(runs // 10, 5))[0])


@torch.no_grad()
def choose_sparse_compute(
    model: nn.Module, example_input: torch.Tensor, *, runs: int = 300, min_speedup: float = 1.1,
    min_sparsity: float = 0.5, threads: int = 1,
) -> list[LayerDecision]:
    """Swap each Linear for a ``CsrLinear`` where that measures faster; returns every decision.

    Timing alternates dense and sparse in rounds so machine noise hits both alike.
    """
    inputs: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(module, args, output) -> None:  # returning a value would replace the output
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [m.register_forward_hook(recorder(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    S.call(model, S.take(example_input, 0, 1))
    for h in hooks:
        h.remove()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    decisions = []
    try:
        for name, x in inputs.items():
            layer = model.get_submodule(name)
            sparsity = float((layer.weight == 0).float().mean())
            if sparsity < min_sparsity:
                decisions.append(LayerDecision(name, sparsity, float("nan"), float("nan"), False))
                continue
            sparse = CsrLinear(layer.weight, layer.bias)
            dense_t, sparse_t = [], []
            for _ in range(3):
                dense_t.append(_median_us(layer, x, runs // 3))
                sparse_t.append(_median_us(sparse, x, runs // 3))
            dense_us, sparse_us = statistics.median(dense_t), statistics.median(sparse_t)
            wins = dense_us >= min_speedup * sparse_us
            decisions.append(LayerDecision(name, sparsity, dense_us, sparse_us, wins))
            if wins:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, sparse)
    finally:
        torch.set_num_threads(previous)
    return decisions


def densify(model: nn.Module) -> nn.Module:
    """Undo ``choose_sparse_compute`` (exporters take dense layers)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CsrLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.to_dense_linear())
    return model
