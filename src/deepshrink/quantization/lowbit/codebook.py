"""Codebook (weight-sharing) quantization and Deep Compression's centroid fine-tuning.

Fine-tuning trains the levels, not the weights: during training each selected weight is a
parametrization ``codebook[indices]`` (pruned positions fixed at 0) whose backward pass sums
the gradients of each level's members (``ops.nonuniform.centroid_gradients``, Han et al. 2016
eq. 3). The float parameters that are not low-bit (biases, layers left in float) train too.

``Codebook(grid="int8")`` keeps a ``GridCodebookWeight``: the same layer-wide levels and
indices, plus one int8-grid scale per output channel onto which each channel's levels are
snapped (``ops.nonuniform.snap_to_grid``). Its fine-tuning trains the float levels through the
snap (straight-through), so the weight the layer computes with is on the grid at every step.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import TrainConfig, TrainFn, run_training
from deepshrink.core.masks import raw_parameter
from deepshrink.data.splits import DataSplits
from deepshrink.ops.nonuniform import (GRID_QMAX, centroid_gradients, decode, decode_on_grid, grid_codes, grid_scales,
                                       snap_to_grid)
from deepshrink.quantization.lowbit.configs import Codebook
from deepshrink.quantization.lowbit.weights import (CodebookWeight, fit_codebook, layer_widths, masks_detached,
                                                    present_mask, quantized_weights, set_quantized)


@dataclass(frozen=True, eq=False)
class GridCodebookWeight:
    """``w_hat[c, ...] = codes[c, indices[c, ...]] * scale[c]`` where ``mask`` (True = kept), exactly 0
    elsewhere, with ``codes = snap_to_grid(codebook, scale)``: int8, ``[out channels, levels]``.

    ``codebook``: the layer's float levels (1-D, sorted as fitted), ``indices``: uint8 of the
    weight's shape, ``scale``: float32 ``[out channels]``, ``max|w_c| / 127`` of the weight before
    quantizing.
    """

    method: str
    bits: int
    codebook: torch.Tensor
    scale: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor | None

    grid = "int8"

    def codes(self) -> torch.Tensor:
        """int8 ``[out channels, levels]``: each channel's levels as integer multiples of its scale."""
        return snap_to_grid(self.codebook, self.scale)

    def int8_weight(self) -> torch.Tensor:
        """int8 codes of the weight's shape (0 where pruned): ``w_hat = int8_weight() * scale`` per row."""
        return grid_codes(self.codes(), self.indices, mask=self.mask)

    def dequantize(self) -> torch.Tensor:
        return decode_on_grid(self.codebook, self.scale, self.indices, mask=self.mask)

    def level_values(self) -> torch.Tensor:
        """``codebook[indices]`` (0 where pruned): the float levels before snapping, as the ``.dsk`` stores them."""
        return decode(self.codebook, self.indices, mask=self.mask)

    def spec(self) -> dict:
        return {"scheme": "codebook", "method": self.method, "bits": self.bits, "grid": self.grid}


def fit_grid_codebook(w: torch.Tensor, *, method: str, bits: int, mask: torch.Tensor | None,
                      kmeans_init: str = "linear", kmeans_iters: int = 100, layer: str = "weight") -> GridCodebookWeight:
    """The layer-wide codebook of ``fit_codebook``, snapped onto the int8 grid of each output channel
    of ``w`` (scales from its kept weights, before quantizing)."""
    fitted = fit_codebook(w, method=method, bits=bits, mask=mask, kmeans_init=kmeans_init,
                          kmeans_iters=kmeans_iters, layer=layer)
    try:
        scale = grid_scales(w.detach(), mask=mask)
    except ConfigError as err:
        raise ConfigError(f"layer {layer} (weight {list(w.shape)}): {err}") from None
    return GridCodebookWeight(method, bits, fitted.codebook, scale, fitted.indices, fitted.mask)


def codebook_quantize_(model: nn.Module, config: Codebook, *, data: DataSplits | None = None,
                       train_fn: TrainFn | None = None) -> nn.Module:
    """Replace each selected layer's weights by one codebook of ``2^bits`` levels (with
    ``config.grid == "int8"`` snapped per output channel), in place; then, with ``config.train``,
    fine-tune the levels on ``data.train`` through ``train_fn``."""
    widths = layer_widths(model, config.bits, config.layers, what="Codebook")
    if config.finetunes and data is None:
        raise ConfigError("Codebook.train: fine-tuning needs training data; pass data=... or leave train out")
    if config.finetunes and train_fn is None:
        run_training(None, model, data, config.train, who="Codebook fine-tuning")   # raises before the model changes
    modules = dict(model.named_modules())
    fit = fit_grid_codebook if config.grid == "int8" else fit_codebook
    fitted = {}
    for name, bits in widths.items():
        weight = modules[name].weight
        mask = present_mask(model, f"{name}.weight", weight)
        fitted[name] = fit(weight, method=config.method, bits=bits, mask=mask,
                           kmeans_init=config.kmeans_init, kmeans_iters=config.kmeans_iters, layer=name)
    for name, qw in fitted.items():
        set_quantized(model, f"{name}.weight", modules[name].weight, qw)
    if config.finetunes:
        finetune_codebooks(model, data, layers=list(fitted), train=config.train, train_fn=train_fn)
    if config.tables == "float16":
        for name in fitted:
            _tables_to_float16(model, name, modules[name])
    return model


def _tables_to_float16(model: nn.Module, name: str, module: nn.Module) -> None:
    """Round layer ``name``'s codebook levels and bias to float16 values (kept in their dtype)."""
    qw = quantized_weights(model)[f"{name}.weight"]
    levels = qw.codebook.to(torch.float16).to(qw.codebook.dtype)
    set_quantized(model, f"{name}.weight", module.weight, dataclasses.replace(qw, codebook=levels))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point():
        with torch.no_grad():
            bias.copy_(bias.to(torch.float16).to(bias.dtype))


def finetune_codebooks(model: nn.Module, data: DataSplits, *, layers: list[str], train: TrainConfig,
                       train_fn: TrainFn | None = None) -> nn.Module:
    """Train the codebooks of ``layers`` (already codebook-quantized) with ``train_fn``, in place.

    Other low-bit weights are frozen so their codes stay valid; the indices never change, nor do
    the scales of int8-grid codebooks (whose snapped levels are what the layers compute with).
    """
    record = quantized_weights(model)
    modules = dict(model.named_modules())
    for name in layers:
        if not isinstance(record.get(f"{name}.weight"), (CodebookWeight, GridCodebookWeight)):
            raise ConfigError(f"finetune_codebooks: layer {name} has no codebook; quantize it with Codebook first")
    frozen = [raw_parameter(model, n) for n in record if n.rsplit(".", 1)[0] not in layers]
    with _frozen(frozen), masks_detached(model):
        for name in layers:
            qw = record[f"{name}.weight"]
            shared = _GridSharedWeight(qw) if isinstance(qw, GridCodebookWeight) else _SharedWeight(qw)
            parametrize.register_parametrization(modules[name], "weight", shared)
        try:
            run_training(train_fn, model, data, train, who="Codebook fine-tuning")
        finally:
            trained = {name: modules[name].parametrizations.weight[0] for name in layers}
            for name in layers:
                parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
    for name, shared in trained.items():
        old = record[f"{name}.weight"]
        weight = modules[name].weight
        levels = shared.codebook.detach().to(weight.dtype).clone()
        if isinstance(old, GridCodebookWeight):
            new = GridCodebookWeight(old.method, old.bits, levels, old.scale, old.indices, old.mask)
        else:
            new = CodebookWeight(old.method, old.bits, levels, old.indices, old.mask)
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


class _GridSharedWeight(_SharedWeight):
    """Parametrization ``weight = snap_to_grid(codebook, scale)[c, indices] * scale[c]``: trains the float levels."""

    def __init__(self, qw: GridCodebookWeight) -> None:
        super().__init__(qw)
        self.register_buffer("scale", qw.scale.clone())

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return _DecodeOnGrid.apply(self.codebook, self.scale, self.indices, self.mask)


class _DecodeOnGrid(torch.autograd.Function):
    """Forward: the exact snapped weight. Backward (straight-through the rounding): a level's
    gradient sums its members' gradients, except in channels where the level is clipped at +-127,
    whose value it no longer moves (as ``fake_quantize`` passes nothing to clipped values)."""

    @staticmethod
    def forward(ctx, codebook, scale, indices, mask):
        ctx.save_for_backward(codebook, scale, indices, mask)
        return decode_on_grid(codebook, scale, indices, mask=mask).to(codebook.dtype)

    @staticmethod
    def backward(ctx, grad_w):
        codebook, scale, indices, mask = ctx.saved_tensors
        ratio = torch.round(codebook.detach().float()[None, :] / scale[:, None])
        inside = grid_codes((ratio.abs() <= GRID_QMAX).to(torch.int8), indices).bool()
        grad = centroid_gradients(grad_w * inside, indices, codebook.numel(), mask=mask)
        return grad, None, None, None


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


__all__ = ["GridCodebookWeight", "fit_grid_codebook", "codebook_quantize_", "finetune_codebooks"]
