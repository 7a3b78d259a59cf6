"""Quantization-aware training of low-bit weights: fake quantization as a parametrization.

``prepare_qat`` registers a parametrization on each selected layer's ``weight`` (the float
weight stays the trained parameter; the forward pass sees its fake-quantized value);
``convert_qat`` removes them and snaps each weight onto its final grid, so the module is a
plain eager module again whose weights take at most ``2^bits`` values per channel.
Pruned weights (attached masks, else exact zeros) are held at 0 during training.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import TrainFn, run_training
from deepshrink.data.splits import DataSplits
from deepshrink.ops.quant_math import (DEFAULT_EPS, choose_qparams, fake_quantize, lsq_fake_quantize, lsq_grad_scale,
                                       qrange, quantize_affine)
from deepshrink.quantization.lowbit.configs import WeightQAT
from deepshrink.quantization.lowbit.weights import (AffineWeight, fit_affine, layer_widths, layout, masks_detached,
                                                    present_mask, set_quantized)
_ATTR = "_deepshrink_qat"


def prepare_qat(model: nn.Module, config: WeightQAT) -> nn.Module:
    """Register the fake-quantizing parametrizations, in place (the model then trains as usual)."""
    if getattr(model, _ATTR, None):
        raise ConfigError("prepare_qat: the model is already prepared; call convert_qat(model) first")
    widths = layer_widths(model, config.bits, config.layers, what="WeightQAT")
    modules = dict(model.named_modules())
    quantizers = {}
    for name, bits in widths.items():
        weight = modules[name].weight
        mask = present_mask(model, f"{name}.weight", weight)
        # fits once so a bad group size or shape fails here, before any module is changed
        fit_affine(weight, bits=bits, symmetric=config.symmetric, granularity=config.granularity,
                   group_size=config.group_size, layer=name)
        if config.method == "lsq":
            quantizers[name] = _LearnedStep(weight.detach(), bits, config.granularity, mask)
        else:
            quantizers[name] = _FakeQuantSTE(bits, config.symmetric, config.granularity, config.group_size, mask)
    for name, quantizer in quantizers.items():
        parametrize.register_parametrization(modules[name], "weight", quantizer)
    object.__setattr__(model, _ATTR, list(quantizers))
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Remove the parametrizations and snap each weight onto its grid (learned or min/max), in place."""
    layers = getattr(model, _ATTR, None)
    if not layers:
        raise ConfigError("convert_qat: the model has no QAT parametrizations; call prepare_qat(model, config) first")
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name]
        quantizer = module.parametrizations.weight[0]
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        set_quantized(model, f"{name}.weight", module.weight, quantizer.snap(module.weight.detach()))
    object.__delattr__(model, _ATTR)
    return model


def train_qat_(model: nn.Module, config: WeightQAT, *, data: DataSplits, train_fn: TrainFn | None = None) -> nn.Module:
    """prepare, ``train_fn`` on ``data`` as ``config.train`` says, convert: the whole QAT step, in place."""
    if train_fn is None and config.train.epochs:
        run_training(None, model, data, config.train, who="WeightQAT")   # raises before the model changes
    teacher = copy.deepcopy(model).eval() if config.train.distill is not None else None
    with masks_detached(model):
        prepare_qat(model, config)
        try:
            if config.train.epochs:
                run_training(train_fn, model, data, config.train, who="WeightQAT", teacher=teacher)
        finally:
            convert_qat(model)
    return model


class _FakeQuantSTE(nn.Module):
    """Min/max qparams of the current weight each step; straight-through rounding."""

    def __init__(self, bits: int, symmetric: bool, granularity: str, group_size: int | None,
                 mask: torch.Tensor | None) -> None:
        super().__init__()
        self.bits, self.symmetric, self.granularity, self.group_size = bits, symmetric, granularity, group_size
        self.register_buffer("mask", mask.clone() if mask is not None else None)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = self._masked(w)
        scale, zero_point = choose_qparams(w.detach(), bits=self.bits, symmetric=self.symmetric,
                                           granularity=self.granularity, axis=0, group_size=self.group_size)
        qmin, qmax = qrange(self.bits, self.symmetric)
        return fake_quantize(w, scale, zero_point, qmin=qmin, qmax=qmax, **layout(self.granularity, self.group_size))

    def snap(self, w: torch.Tensor) -> AffineWeight:
        return fit_affine(self._masked(w), bits=self.bits, symmetric=self.symmetric,
                          granularity=self.granularity, group_size=self.group_size)

    def _masked(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.mask is None else w * self.mask


class _LearnedStep(nn.Module):
    """LSQ: a learned positive step per output channel (or per tensor), symmetric signed codes.

    Initialised as in the paper, ``2 mean|w| / sqrt(qmax)`` over the kept weights sharing the
    step, which at 2..4 bits clips the tails instead of spending levels on the largest weight.
    """

    def __init__(self, w: torch.Tensor, bits: int, granularity: str, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.bits, self.granularity = bits, granularity
        self.qmin, self.qmax = qrange(bits, True)
        self.register_buffer("mask", mask.clone() if mask is not None else None)
        keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
        absw = (w.abs() * keep).float()
        if granularity == "per_channel":
            rows, kept = absw.reshape(w.shape[0], -1), keep.reshape(w.shape[0], -1)
            count = kept.sum(1).clamp(min=1)
            init = 2 * rows.sum(1) / count / self.qmax ** 0.5
            n_per_step = w.numel() // w.shape[0]
        else:
            init = 2 * absw.sum() / keep.sum().clamp(min=1) / self.qmax ** 0.5
            n_per_step = w.numel()
        self.scale = nn.Parameter(init.clamp(min=DEFAULT_EPS))
        self.grad_scale = lsq_grad_scale(n_per_step, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = w if self.mask is None else w * self.mask
        axis = 0 if self.granularity == "per_channel" else None
        return lsq_fake_quantize(w, self.step(), qmin=self.qmin, qmax=self.qmax, grad_scale=self.grad_scale, axis=axis)

    def step(self) -> torch.Tensor:
        # the optimizer may push a step through 0; |s| keeps it a step, eps keeps x / s finite
        return self.scale.abs().clamp(min=DEFAULT_EPS)

    def snap(self, w: torch.Tensor) -> AffineWeight:
        w = w if self.mask is None else w * self.mask
        scale = self.step().detach().float().clone()
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        q = quantize_affine(w, scale, zero_point, qmin=self.qmin, qmax=self.qmax, **layout(self.granularity, None))
        return AffineWeight(self.bits, True, self.granularity, None, q, scale, zero_point)


__all__ = ["prepare_qat", "convert_qat", "train_qat_"]
