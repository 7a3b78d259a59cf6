"""Parameter, non-zero and MAC counts of any module or graph (torch only, so that every layer may count).

MACs come from the framework: one forward under ``torch.utils.flop_counter.FlopCounterMode``,
which sees every matmul and convolution after dispatch, whether it came from ``nn.Linear``,
``F.linear``, ``@``, attention or a PT2E graph's ``dequantize -> linear`` — so a quantized graph
counts the MACs of the float model it came from. Parameters are read from what the module
stores, by what each tensor *is* (a parameter, a weight buffer, an int8 weight a graph
dequantizes), never by its name.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from deepshrink.core import samples as S

aten = torch.ops.aten


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) over every weight tensor the module stores, each once.

    An eager module counts its parameters and its persistent floating-point buffers (a CSR
    layer's values, say), but not normalization running statistics (estimates of activations
    that export folds away) nor integer bookkeeping (``num_batches_tracked``, CSR indices).

    A graph (``torch.fx.GraphModule``: a PT2E-quantized model, a loaded ``.pt2``) counts only what
    its graph reads: conversion can leave the float originals registered beside the int8 copies.
    An int8 weight counts once, as the tensor a dequantize reads; its scales and zero points,
    scalar constants and a float graph's running statistics do not count.
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    tensors = _graph_weights(model) if isinstance(model, torch.fx.GraphModule) else _eager_weights(model)
    seen: set[int] = set()
    total = nonzero = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def _eager_weights(model: nn.Module) -> list[torch.Tensor]:
    statistics = {id(t) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                  for t in (m.running_mean, m.running_var) if t is not None}
    weights = list(model.parameters())
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if (buffer is not None and buffer.is_floating_point() and id(buffer) not in statistics
                    and name not in module._non_persistent_buffers_set):
                weights.append(buffer)
    return weights


def _graph_weights(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    parameters = {id(p) for p in gm.parameters()}
    weights = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _resolve(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        roles = {_role(user, node) for user in node.users}
        if id(value) in parameters or "weight" in roles or ("value" in roles and value.ndim > 0 and value.is_floating_point()):
            weights.append(value)
    return weights


def _role(user: torch.fx.Node, attr: torch.fx.Node) -> str:
    """What ``attr`` is to ``user``: quantized "weight" data, a "qparam", a "statistic" or a plain "value"."""
    target = user.target
    schema = getattr(target, "_schema", None)
    if user.op != "call_function" or schema is None:
        return "value"
    names = [a.name for a in schema.arguments]
    positions = [names[i] for i, a in enumerate(user.args) if a is attr and i < len(names)]
    positions += [k for k, a in user.kwargs.items() if a is attr]
    if schema.name.split("::")[0] in ("quantized_decomposed", "torchao") and "quantize" in schema.name:
        # the data a (de)quantize reads is its first argument; every other tensor is a qparam
        return "weight" if positions and positions[0] == names[0] else "qparam"
    if positions and all(p in ("running_mean", "running_var") for p in positions):
        return "statistic"
    return "value"


def _resolve(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


@torch.no_grad()
def count_macs(model: nn.Module, example_input) -> int:
    """Multiply-accumulates of one sample (the first of ``example_input``) through ``model``.

    Any module, ``torch.fx`` graph or ``torch.export`` program: the forward runs once under
    FlopCounterMode, and each matmul or convolution counts FLOPs / 2 (bias adds, activations,
    pooling and normalization count nothing). A sparse matmul (CSR layers) counts its stored
    non-zeros; a dense one counts every weight, zero or not. Batch norm statistics are not
    updated by the counting pass.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    sample = S.take(example_input, 0, 1)
    eager = not isinstance(model, torch.fx.GraphModule)   # an exported graph refuses .eval()
    was_training = model.training
    if eager:
        model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_CPU_FORMULAS) as counter:
            S.call(model, sample)
    finally:
        if eager:
            model.train(was_training)
    return counter.get_total_flops() // 2


# FlopCounterMode knows the CUDA kernels of attention and no CPU recurrent kernel; CPU dispatches to these
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _mkldnn_rnn_flops(input, weight0, weight1, *args, out_shape=None, **kwargs) -> int:
    # one layer, one direction: every step multiplies the input by W_ih and the state by W_hh
    steps = math.prod(input[:-1])
    return 2 * steps * (math.prod(weight0) + math.prod(weight1))


def _dense_or_sparse_mm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.layout != torch.strided:
        return 2 * int(a._nnz()) * b.shape[-1]
    if b.layout != torch.strided:
        return 2 * int(b._nnz()) * a.shape[0]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _mm_flops(a, b, *args, out_val=None, **kwargs) -> int:
    return _dense_or_sparse_mm_flops(a, b)


def _addmm_flops(bias, a, b, *args, out_val=None, **kwargs) -> int:
    return _dense_or_sparse_mm_flops(a, b)


for _raw in (_mm_flops, _addmm_flops):
    _raw._get_raw = True   # FlopCounterMode passes these the tensors, not their shapes (layout, nnz)

_CPU_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    aten.mkldnn_rnn_layer: _mkldnn_rnn_flops,
    aten.mm: _mm_flops,
    aten.addmm: _addmm_flops,
    aten._sparse_addmm: _addmm_flops,
}
