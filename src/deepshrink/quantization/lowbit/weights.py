"""Quantized weights as stored, which layers a config touches, and the record kept on the model.

A weight-only scheme keeps an eager module whose float weights lie exactly on their grid or
codebook; the integer codes behind them are remembered beside the module (like pruning masks,
not as parameters or buffers) so ``save_compressed`` can write the codes rather than floats.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import get_masks, raw_parameter, without_masks
from deepshrink.core.selection import first_match, select, weighted_layers
from deepshrink.ops.nonuniform import decode, equal_population_codebook, kmeans_codebook, power_of_two_codebook
from deepshrink.ops.quant_math import choose_qparams, dequantize_affine, qrange, quantize_affine

_ATTR = "_deepshrink_lowbit"


@dataclass(frozen=True, eq=False)
class AffineWeight:
    """``w_hat = (q - zero_point) * scale`` with ``q`` in ``qrange(bits, symmetric)``.

    ``q``: integer codes of the weight's shape; ``scale``/``zero_point``: the qparams of
    ``ops.quant_math.choose_qparams`` (per_channel along axis 0, the output channels).
    """

    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None
    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def layout(self) -> dict:
        """The ``axis``/``group_size`` keywords of quantize_affine for this weight."""
        return layout(self.granularity, self.group_size)

    def dequantize(self) -> torch.Tensor:
        return dequantize_affine(self.q, self.scale, self.zero_point, **self.layout())

    def centered_codes(self) -> torch.Tensor:
        """``q - zero_point`` as float: integer-valued, and exactly 0 where ``w_hat`` is 0."""
        return dequantize_affine(self.q, torch.ones_like(self.scale), self.zero_point, **self.layout())

    def spec(self) -> dict:
        return {"scheme": "affine", "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity, "group_size": self.group_size}


@dataclass(frozen=True, eq=False)
class CodebookWeight:
    """``w_hat = codebook[indices]`` where ``mask`` (True = kept), exactly 0 elsewhere."""

    method: str
    bits: int
    codebook: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        return decode(self.codebook, self.indices, mask=self.mask)

    def spec(self) -> dict:
        return {"scheme": "codebook", "method": self.method, "bits": self.bits}


QuantizedWeight = AffineWeight | CodebookWeight


def fit_affine(w: torch.Tensor, *, bits: int, symmetric: bool, granularity: str, group_size: int | None,
               layer: str = "weight") -> AffineWeight:
    """Min/max qparams and codes for ``w``; a ``ConfigError`` names ``layer`` and its shape."""
    try:
        scale, zero_point = choose_qparams(w, bits=bits, symmetric=symmetric, granularity=granularity,
                                           axis=0, group_size=group_size)
        qmin, qmax = qrange(bits, symmetric)
        q = quantize_affine(w, scale, zero_point, qmin=qmin, qmax=qmax, **layout(granularity, group_size))
    except ConfigError as err:
        raise ConfigError(f"layer {layer} (weight {list(w.shape)}): {err}") from None
    return AffineWeight(bits, symmetric, granularity, group_size, q, scale, zero_point)


CODEBOOK_FITTERS = {
    "kmeans": kmeans_codebook,
    "equal_population": equal_population_codebook,
    "power_of_two": power_of_two_codebook,
}


def fit_codebook(w: torch.Tensor, *, method: str, bits: int, mask: torch.Tensor | None,
                 kmeans_init: str = "linear", kmeans_iters: int = 100, layer: str = "weight") -> CodebookWeight:
    """One codebook for the kept weights of ``w``; pruned positions decode to exactly 0."""
    if method not in CODEBOOK_FITTERS:
        raise ConfigError(f"method: {method!r} is not one of {', '.join(map(repr, CODEBOOK_FITTERS))}")
    extra = {"init": kmeans_init, "iters": kmeans_iters} if method == "kmeans" else {}
    try:
        codebook, indices = CODEBOOK_FITTERS[method](w.detach(), bits, mask=mask, **extra)
    except ConfigError as err:
        raise ConfigError(f"layer {layer} (weight {list(w.shape)}): {err}") from None
    return CodebookWeight(method, bits, codebook, indices, mask)


def layer_widths(model: nn.Module, bits: int, layers: Mapping[str, int | None], *, what: str) -> dict[str, int]:
    """``{module name: width}`` of the Conv/Linear layers to quantize (``None`` widths dropped).

    Every pattern must match at least one layer: a typo must not silently quantize nothing.
    """
    candidates = weighted_layers(model)
    if not candidates:
        raise ConfigError(f"{what}: the model has no Conv or Linear layer to quantize")
    for pattern in layers:
        select(candidates, [pattern], what=f"{what}.layers")
    widths = {name: first_match(name, layers, bits) for name in candidates}
    return {name: b for name, b in widths.items() if b is not None}


def present_mask(model: nn.Module, param_name: str, weight: torch.Tensor) -> torch.Tensor | None:
    """Kept weights: the attached pruning mask, else the nonzeros if any weight is exactly 0."""
    masks = get_masks(model)
    if param_name in masks:
        return masks[param_name].to(torch.bool)
    zeros = weight.detach() == 0
    return ~zeros if bool(zeros.any()) else None


def quantized_weights(model: nn.Module) -> Mapping[str, QuantizedWeight]:
    """``{parameter name: quantized weight}`` of every weight a low-bit scheme has set."""
    return getattr(model, _ATTR, {})


def set_quantized(model: nn.Module, param_name: str, weight: nn.Parameter, qw: QuantizedWeight) -> None:
    """Write ``qw``'s float values into ``weight`` (behind a pruning mask: the tensor it reads) and
    remember its codes on ``model``."""
    target = raw_parameter(model, param_name)
    with torch.no_grad():
        target.copy_(qw.dequantize().to(target.dtype))
    record = dict(quantized_weights(model))
    record[param_name] = qw
    object.__setattr__(model, _ATTR, record)


def forget_quantized(model: nn.Module, param_names: list[str]) -> None:
    """Drop the codes of ``param_names`` from ``model``'s record (their layers were replaced)."""
    record = {n: qw for n, qw in quantized_weights(model).items() if n not in set(param_names)}
    object.__setattr__(model, _ATTR, record)


def layout(granularity: str, group_size: int | None) -> dict:
    """The ``axis``/``group_size`` keywords of quantize_affine for a granularity (axis 0 = output channels)."""
    if granularity == "per_channel":
        return {"axis": 0}
    if granularity == "per_group":
        return {"group_size": group_size}
    return {}


@contextlib.contextmanager
def masks_detached(model: nn.Module) -> Iterator[None]:
    """The low-bit parametrizations (fake quantization, shared codebooks) replace ``weight`` and
    hold pruned weights at 0 themselves, so the pruning masks step aside meanwhile."""
    with without_masks(model):
        yield


__all__ = ["AffineWeight", "CodebookWeight", "QuantizedWeight", "fit_affine", "fit_codebook", "layer_widths",
           "present_mask", "quantized_weights", "set_quantized", "forget_quantized", "masks_detached", "layout", "CODEBOOK_FITTERS"]
