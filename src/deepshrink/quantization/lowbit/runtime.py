"""Linear layers that run at low bits in the runtime: int8 (or 4-bit) weight codes, and int8
activations quantized per row at run time (``Int8DynamicLowBit``).

``DynamicQuantLinear`` computes in eager PyTorch what XNNPACK's qd8-f32-qb4w / qd8-f32-qc8w GEMMs
compute: each input row is quantized to int8 with its own scale and zero point (asymmetric, the
range always containing 0: torchao's ``int8_asym_per_token``), the weight is ``codes * scale`` per
group of input weights (or per output channel), and the product is accumulated in float. Under
``torch.export`` it is the pattern XNNPACK's partitioner delegates — the one torchao's
``quantize_(m, Int8DynamicActivationIntxWeightConfig(...))`` plus ``unwrap_tensor_subclass``
produce: ``choose_qparams_affine -> quantize_affine -> dequantize_affine`` on the activation,
``dequantize_affine`` of a constant int8 weight, then ``linear``. The ``.pte`` then stores the codes
at 4 bits (two per byte) or 8 and the group scales as bfloat16.

Codes are kept padded: a 4-bit layer whose input size is not a multiple of its group gets zero
columns appended, and the input the same number of zeros (exact: a zero adds nothing to a product
and leaves the row's range, which contains 0, as it was). So any Linear can be 4-bit, at the cost
of the padded columns' bytes (784 -> 800 inputs for groups of 32).

A Linear whose weight a uniform scheme put on a symmetric grid of the runtime's kind (``WeightQAT``,
``WeightOnly``: the same bits, per channel or per group of the same size) keeps those codes and
scales (4-bit scales rounded to bfloat16), so weight QAT shortens the runtime file with the grid it
trained. A Linear whose weight is an int8-grid codebook (``Codebook(grid="int8")``) and that is made 8-bit
keeps the codes and scales the codebook recorded, so ``q * scale`` is bit for bit the eager weight
(and the ``.dsk``'s). Min/max scales recomputed from the snapped weight would not do: a channel
whose largest level snaps below 127 has a smaller max, and even at 127, ``fl(fl(127 * s) / 127)``
need not be ``s``. The replaced layers' low-bit records are dropped from the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.selection import first_match, select
from deepshrink.ops.quant_math import choose_qparams, qrange, quantize_affine
from deepshrink.quantization.lowbit.codebook import GridCodebookWeight
from deepshrink.quantization.lowbit.configs import RUNTIME_GROUP_MULTIPLE, Int8DynamicLowBit
from deepshrink.quantization.lowbit.weights import forget_quantized, quantized_weights

ACTIVATIONS = "int8 asymmetric per row, quantized at run time"


def _primitives():
    # torchao's quant primitives register torch.ops.torchao.*; imported on use so that
    # ``import deepshrink`` stays cheap
    from torchao.quantization import quant_primitives

    return quant_primitives


@dataclass(frozen=True, eq=False)
class RuntimeWeight:
    """Symmetric codes ``q`` [out, padded_in] (int8 storage, values in ``qrange(bits)``) and their
    scales [out, padded_in // group]: ``w_hat = q * scale`` per group of ``group`` input weights."""

    bits: int
    group: int
    q: torch.Tensor
    scale: torch.Tensor


def fit_runtime_weight(w: torch.Tensor, *, bits: int, group_size: int | None, layer: str = "weight") -> RuntimeWeight:
    """Min/max symmetric codes of a Linear weight ``w`` [out, in] for the runtime's kernels.

    8 bits: one scale per output channel (qc8w), no padding. 4 bits: groups of ``group_size``
    input weights (``None``: the whole row, one group), the row zero-padded to a multiple of the
    group (itself a multiple of 32, XNNPACK's constraint), and the scales rounded to bfloat16
    before the codes are chosen, so the codes are right for the scales the runtime keeps.
    """
    if w.dim() != 2:
        raise ConfigError(f"layer {layer}: weight of shape {list(w.shape)} is not a Linear weight [out, in]")
    out_features, in_features = w.shape
    w = w.detach().float()
    qmin, qmax = qrange(bits, True)
    if bits == 8:
        group, padded = in_features, in_features
    else:
        unit = group_size or RUNTIME_GROUP_MULTIPLE
        padded = math.ceil(in_features / unit) * unit
        group = group_size or padded
        w = F.pad(w, (0, padded - in_features))
    scale, zero_point = choose_qparams(w, bits=bits, symmetric=True, granularity="per_group", group_size=group)
    if bits == 4:
        # XNNPACK keeps groupwise scales as bfloat16; a scale rounded down may clip a code at the
        # range's end by a fraction of a step, which is what the runtime does too
        scale = scale.to(torch.bfloat16).float().clamp_min(torch.finfo(torch.bfloat16).tiny)
    q = quantize_affine(w, scale, zero_point, qmin=qmin, qmax=qmax, group_size=group)
    return RuntimeWeight(bits, group, q.to(torch.int8), scale)


class DynamicQuantLinear(nn.Module):
    """``y = linear(int8_round_trip_per_row(pad(x)), q * scale) + bias``; see the module doc.

    ``qdata`` is a frozen int8 parameter (so parameter counts and ``torch.export`` see the weight);
    ``scale`` / ``zero_point`` (all 0: symmetric) are buffers.
    """

    def __init__(self, weight: RuntimeWeight, bias: torch.Tensor | None, *, in_features: int) -> None:
        super().__init__()
        self.bits, self.group = weight.bits, weight.group
        self.in_features, self.out_features = in_features, int(weight.q.shape[0])
        self.qdata = nn.Parameter(weight.q.contiguous(), requires_grad=False)
        self.register_buffer("scale", weight.scale.contiguous())
        self.register_buffer("zero_point", torch.zeros(weight.scale.shape, dtype=torch.int8))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float(), requires_grad=False)

    @property
    def padded_in_features(self) -> int:
        return int(self.qdata.shape[1])

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [out, in] the codes stand for (padding dropped)."""
        return self._weight(torch.float32)[:, : self.in_features]

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        qmin, qmax = qrange(self.bits, True)
        return _primitives().dequantize_affine(self.qdata, (1, self.group), self.scale, self.zero_point, torch.int8,
                                               qmin, qmax, output_dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.padded_in_features - self.in_features
        if pad:
            x = F.pad(x, (0, pad))
        return F.linear(int8_per_row_round_trip(x), self._weight(x.dtype), self.bias)

    def spec(self) -> dict:
        """What the runtime stores and runs for this layer (plain data, for the sidecar)."""
        per_channel = self.group == self.padded_in_features
        kernel = "qd8-f32-qb4w" if self.bits == 4 else "qd8-f32-qc8w"   # XNNPACK runs 4-bit per channel as one group
        return {"bits": self.bits, "granularity": "per_channel" if per_channel else "per_group",
                "group_size": None if per_channel else self.group, "symmetric": True,
                "scale_dtype": "bfloat16" if self.bits == 4 else "float32", "kernel": kernel,
                "in_features": self.in_features, "padded_in_features": self.padded_in_features,
                "out_features": self.out_features, "activations": ACTIVATIONS}

    def extra_repr(self) -> str:
        s = self.spec()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={s['group_size']}, padded_in_features={self.padded_in_features}, bias={self.bias is not None}")


def int8_per_row_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to int8 and back, one asymmetric scale and zero point per row of the last
    dimension: exactly the ops torchao's ``int8_asym_per_token`` activation quantization emits."""
    qp = _primitives()
    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    scale, zero_point = qp.choose_qparams_affine(x, qp.MappingType.ASYMMETRIC, block, torch.int8, -128, 127,
                                                 zero_point_dtype=torch.int8)
    q = qp.quantize_affine(x, block, scale, zero_point, torch.int8, -128, 127)
    return qp.dequantize_affine(q, block, scale, zero_point, torch.int8, -128, 127, output_dtype=x.dtype)


def linear_widths(model: nn.Module, config: Int8DynamicLowBit) -> dict[str, int]:
    """``{Linear name: 4 or 8}`` of the layers ``config`` selects; every pattern must match a Linear."""
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ConfigError("Int8DynamicLowBit: the model has no nn.Linear layer to quantize (Conv layers stay float)")
    for pattern in config.layers:
        try:
            select(linears, [pattern], what="Int8DynamicLowBit.layers")
        except ConfigError as err:
            raise ConfigError(f"{err} (Int8DynamicLowBit selects nn.Linear layers only; Conv layers stay float)") from None
    widths = {name: first_match(name, config.layers, config.bits) for name in linears}
    return {name: b for name, b in widths.items() if b is not None}


def to_dynamic_lowbit_(model: nn.Module, config: Int8DynamicLowBit) -> nn.Module:
    """Replace the selected Linear layers of ``model`` by ``DynamicQuantLinear``, in place.

    Every layer is fitted before any is replaced, so an error leaves the model as it was.
    Returns the model (a new module only if ``model`` itself is the one Linear).
    """
    widths = linear_widths(model, config)
    modules = dict(model.named_modules())
    recorded = quantized_weights(model)
    replacements: dict[int, nn.Module] = {}   # by identity: a Linear shared under two names stays shared
    for name, bits in widths.items():
        linear = modules[name]
        if id(linear) not in replacements:
            record = recorded.get(_weight_name(name))
            weight = ((_recorded_int8(record, linear.weight) if bits == 8 else None)
                      or _recorded_affine(record, linear.weight, bits=bits, group_size=config.group_size)
                      or fit_runtime_weight(linear.weight, bits=bits, group_size=config.group_size, layer=name))
            replacements[id(linear)] = DynamicQuantLinear(weight, linear.bias, in_features=linear.in_features).to(
                linear.weight.device)
    forget_quantized(model, [_weight_name(name) for name in widths])
    if "" in widths:
        return replacements[id(model)].train(model.training)
    for name in widths:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        setattr(parent, child, replacements[id(modules[name])].train(parent.training))
    return model


def _weight_name(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"


def _recorded_int8(qw: object, weight: torch.Tensor) -> RuntimeWeight | None:
    """The codes and scales of an int8-grid codebook that still is ``weight`` (None otherwise:
    no such record, or the weight was trained since and the codes no longer describe it)."""
    if not isinstance(qw, GridCodebookWeight) or weight.dim() != 2:
        return None
    if not torch.equal(qw.dequantize(), weight.detach().float()):
        return None
    return RuntimeWeight(8, int(weight.shape[1]), qw.int8_weight(), qw.scale.float().reshape(-1, 1))


def _recorded_affine(qw: object, weight: torch.Tensor, *, bits: int, group_size: int | None) -> RuntimeWeight | None:
    """The codes and scales a uniform weight scheme recorded (``WeightQAT``'s learned steps,
    ``WeightOnly``'s), when they are what the runtime stores: symmetric, the same bits, one scale
    per output channel (or per group of the runtime's group size), and still the layer's weight.
    Refitting min/max scales instead would move a trained grid: LSQ learns steps whose largest
    code can stay below the range's end, which a refit stretches back to it (the tests: a +-4 grid
    refit to +-7). 4-bit scales are rounded to bfloat16, as XNNPACK stores them (at most 2^-9 of
    each weight). ``bench/results/shipped.md``: the QAT'd 4-bit LeNet-300-100 .pte at 1.52 % error."""
    from deepshrink.quantization.lowbit.weights import AffineWeight

    if not (isinstance(qw, AffineWeight) and qw.symmetric and qw.bits == bits and weight.dim() == 2):
        return None
    if not torch.equal(qw.dequantize(), weight.detach().float()):
        return None   # trained since: the codes no longer describe it
    out_features, in_features = weight.shape
    if qw.granularity == "per_channel" and (bits == 8 or group_size is None):
        if bits == 8:
            return RuntimeWeight(8, in_features, qw.q.to(torch.int8), qw.scale.float().reshape(-1, 1))
        padded = math.ceil(in_features / RUNTIME_GROUP_MULTIPLE) * RUNTIME_GROUP_MULTIPLE
        group, scale = padded, qw.scale.float().reshape(-1, 1)
    elif qw.granularity == "per_group" and bits == 4 and group_size == qw.group_size and in_features % group_size == 0:
        padded, group, scale = in_features, group_size, qw.scale.float().reshape(out_features, -1)
    else:
        return None
    q = F.pad(qw.q.to(torch.int8).reshape(out_features, in_features), (0, padded - in_features))
    scale = scale.to(torch.bfloat16).float().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return RuntimeWeight(4, group, q, scale)


def runtime_weights(model: nn.Module) -> dict[str, dict]:
    """``{layer name: spec}`` of every ``DynamicQuantLinear`` in ``model`` (empty if none)."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, DynamicQuantLinear)}


def has_dynamic_lowbit(model: nn.Module) -> bool:
    return isinstance(model, nn.Module) and any(isinstance(m, DynamicQuantLinear) for m in model.modules())


__all__ = ["DynamicQuantLinear", "RuntimeWeight", "fit_runtime_weight", "int8_per_row_round_trip", "linear_widths",
           "to_dynamic_lowbit_", "runtime_weights", "has_dynamic_lowbit", "ACTIVATIONS"]
