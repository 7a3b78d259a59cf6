"""Parameter, non-zero and MAC counts of eager modules (torch only, so that every layer may count)."""
from __future__ import annotations

import torch
from torch import nn

from deepshrink.core import samples as S


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) over every tensor the module stores.

    A quantized graph keeps its weights as int8 constants (buffers or plain attributes), so
    those count too; scales and zero points (1-element or per-channel qparams) do not.
    """
    seen: set[int] = set()
    total = nonzero = 0
    if isinstance(model, torch.fx.GraphModule):
        # only what the graph reads: conversion can leave the float originals registered
        tensors = []
        for node in model.graph.nodes:
            if node.op == "get_attr":
                value = _resolve(model, node.target)
                if isinstance(value, torch.Tensor):
                    tensors.append((node.target, value))
    else:
        # integer buffers are bookkeeping (BatchNorm's num_batches_tracked, CSR indices), not weights
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        tensors = list(model.named_parameters()) + buffers
    for name, t in tensors:
        if id(t) in seen or t.ndim == 0 or "scale" in name or "zero_point" in name:
            continue
        seen.add(id(t))
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def _resolve(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int | None:
    """Multiply-accumulates of one sample through the dense Conv/Linear layers (eager models).

    ``None`` for a module without Conv/Linear submodules (an exported graph): unknown here.
    """
    macs = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features
        else:
            kernel = module.weight[0].numel()  # in_channels/groups * kernel area
            macs += kernel * output[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not handles:
        return None
    try:
        S.call(model, S.take(example_input, 0, 1))
    finally:
        for h in handles:
            h.remove()
    return macs
