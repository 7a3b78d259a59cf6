"""Codebook (weight-sharing) quantization and Deep Compression's centroid fine-tuning.

Fine-tuning trains the levels, not the weights: during training each selected weight is a
parametrization ``codebook[indices]`` (pruned positions fixed at 0) whose backward pass sums
the gradients of each level's members (``ops.nonuniform.centroid_gradients``, Han et al. 2016
eq. 3). The float parameters that are not low-bit (biases, layers left in float) train too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import TrainConfig, TrainFn, run_training
from deepshrink.core.masks import raw_parameter
from deepshrink.data.splits import DataSplits
from deepshrink.ops.nonuniform import centroid_gradients, decode
from deepshrink.quantization.lowbit.configs import Codebook
from deepshrink.quantization.lowbit.weights import (CodebookWeight, fit_codebook, layer_widths, masks_detached,
                                                    present_mask, quantized_weights, set_quantized)


def codebook_quantize_(model: nn.Module, config: Codebook, *, data: DataSplits | None = None,
                       train_fn: TrainFn | None = None) -> nn.Module:
    """Replace each selected layer's weights by one codebook of ``2^bits`` levels, in place;
    then, with ``config.train``, fine-tune the levels on ``data.train`` through ``train_fn``."""
    widths = layer_widths(model, config.bits, config.layers, what="Codebook")
    if config.finetunes and data is None:
        raise ConfigError("Codebook.train: fine-tuning needs training data; pass data=... or leave train out")
    if config.finetunes and train_fn is None:
        run_training(None, model, data, config.train, who="Codebook fine-tuning")   # raises before the model changes
    modules = dict(model.named_modules())
    fitted = {}
    for name, bits in widths.items():
        weight = modules[name].weight
        mask = present_mask(model, f"{name}.weight", weight)
        fitted[name] = fit_codebook(weight, method=config.method, bits=bits, mask=mask,
                                    kmeans_init=config.kmeans_init, kmeans_iters=config.kmeans_iters, layer=name)
    for name, qw in fitted.items():
        set_quantized(model, f"{name}.weight", modules[name].weight, qw)
    if config.finetunes:
        finetune_codebooks(model, data, layers=list(fitted), train=config.train, train_fn=train_fn)
    return model


def finetune_codebooks(model: nn.Module, data: DataSplits, *, layers: list[str], train: TrainConfig,
                       train_fn: TrainFn | None = None) -> nn.Module:
    """Train the codebooks of ``layers`` (already codebook-quantized) with ``train_fn``, in place.

    Other low-bit weights are frozen so their codes stay valid; the indices never change.
    """
    record = quantized_weights(model)
    modules = dict(model.named_modules())
    for name in layers:
        if not isinstance(record.get(f"{name}.weight"), CodebookWeight):
            raise ConfigError(f"finetune_codebooks: layer {name} has no codebook; quantize it with Codebook first")
    frozen = [raw_parameter(model, n) for n in record if n.rsplit(".", 1)[0] not in layers]
    with _frozen(frozen), masks_detached(model):
        for name in layers:
            parametrize.register_parametrization(modules[name], "weight", _SharedWeight(record[f"{name}.weight"]))
        try:
            run_training(train_fn, model, data, train, who="Codebook fine-tuning")
        finally:
            trained = {name: modules[name].parametrizations.weight[0] for name in layers}
            for name in layers:
                parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
    for name, shared in trained.items():
        old = record[f"{name}.weight"]
        weight = modules[name].weight
        new = CodebookWeight(old.method, old.bits, shared.codebook.detach().to(weight.dtype).clone(),
                             old.indices, old.mask)
        set_quantized(model, f"{name}.weight", weight, new)
    return model


class _SharedWeight(nn.Module):
    """Parametrization ``weight = codebook[indices]``; the float weight it replaces is ignored."""

    def __init__(self, qw: CodebookWeight) -> None:
        super().__init__()
        self.codebook = nn.Parameter(qw.codebook.detach().clone())
        self.register_buffer("indices", qw.indices.clone())
        self.register_buffer("mask", qw.mask.clone() if qw.mask is not None else None)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return _DecodeShared.apply(self.codebook, self.indices, self.mask)


class _DecodeShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codebook, indices, mask):
        ctx.save_for_backward(indices, mask)
        ctx.n_levels = codebook.numel()
        return decode(codebook, indices, mask=mask)

    @staticmethod
    def backward(ctx, grad_w):
        indices, mask = ctx.saved_tensors
        return centroid_gradients(grad_w, indices, ctx.n_levels, mask=mask), None, None


@contextlib.contextmanager
def _frozen(params: list[nn.Parameter]) -> Iterator[None]:
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)


__all__ = ["codebook_quantize_", "finetune_codebooks"]
