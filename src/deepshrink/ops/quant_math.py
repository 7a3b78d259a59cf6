"""Uniform affine quantization: choose qparams, quantize, dequantize, fake-quantize, LSQ.

Conventions (every function here is pure; the module imports torch and deepshrink.core only):

- ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``.
  ``torch.round`` rounds half to even, the same as PyTorch's and XNNPACK's quantizers.
- Scales are float32, zero points int32, whatever the input dtype, so that a bf16 weight and
  its fp32 copy get identical qparams.
- The granularity is carried by the qparams' shapes and named again at each call:

  - per_tensor: shape ``[]``; pass neither ``axis`` nor ``group_size`` to quantize_affine.
  - per_channel: shape ``[x.shape[axis]]``; pass ``axis=axis``.
  - per_group: shape ``[x.shape[0], row_len // group_size]``; pass ``group_size=group_size``.

  ``row_len`` is ``x.numel() // x.shape[0]``: groups are contiguous runs of the 2-D view
  ``[shape[0], -1]``, i.e. along the input dimension of a linear weight or across
  ``(in, kh, kw)`` of a conv weight, never straddling two output channels.
"""
from __future__ import annotations

import math

import torch

from deepshrink.core.errors import ConfigError

GRANULARITIES = ("per_tensor", "per_channel", "per_group")

# Smallest scale ever returned: an all-zero channel gets this instead of 0, so x / scale is
# 0 / eps = 0 rather than 0 / 0 = NaN. Same default as torchao.
DEFAULT_EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range for ``bits``: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.

    The signed range is the full two's-complement one (-128..127 at 8 bits), matching
    ``torch.qint8`` and XNNPACK's int8 kernels, so exported tensors need no re-mapping.
    ``choose_qparams`` still divides by ``qmax`` (127), not by 128 or 127.5: the grid is then
    symmetric around zero and both ``+max|x|`` and ``-max|x|`` are exact, and -128 is only
    reached by values clipped from beyond the calibrated range. This equals the "restricted"
    range -127..127 for calibrated values while keeping the standard storage range.
    """
    _check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def choose_qparams(
    x: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    granularity: str,
    axis: int = 0,
    group_size: int | None = None,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering the min/max of ``x`` at the given granularity.

    Symmetric: ``scale = max|x| / qmax``, ``zero_point = 0`` (signed integers).
    Asymmetric: the range ``[min(x, 0), max(x, 0)]`` -- always containing 0, so that zero
    (padding, pruned weights, ReLU outputs) is exactly representable -- is spread over
    ``0..2^b-1`` with ``zero_point = qmin - round(min / scale)`` clamped into range.
    ``axis`` is used only by ``per_channel``; ``group_size`` only by ``per_group``.
    Returns ``(scale float32, zero_point int32)`` with the shapes in the module docstring.
    """
    qmin, qmax = qrange(bits, symmetric)
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"granularity: {granularity!r} is not allowed; choose one of "
            + ", ".join(repr(g) for g in GRANULARITIES)
        )
    if not eps > 0:
        raise ConfigError(f"eps: {eps} must be > 0; it is the scale given to all-zero channels")
    if x.numel() == 0:
        raise ConfigError(f"x: empty tensor of shape {list(x.shape)} has no range to quantize")
    xf = x.detach().float()
    if granularity == "per_tensor":
        lo, hi = xf.amin(), xf.amax()
    elif granularity == "per_channel":
        axis = _normalize_axis(axis, xf.dim())
        rows = xf.movedim(axis, 0).reshape(xf.shape[axis], -1)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    else:
        groups = _group_view(xf, _check_group_size(group_size, xf))
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)

    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / qmax, min=eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as the smallest integer dtype.

    The dtype is ``uint8`` for ranges inside 0..255, ``int8`` inside -128..127, else ``int16``
    (or ``int32``), so the result is exactly what a runtime stores. Pass ``axis`` for
    per-channel qparams, ``group_size`` for per-group ones, neither for per-tensor.
    """
    _check_qrange(qmin, qmax)
    q = _quantize_float(x.float(), scale, zero_point, qmin, qmax, axis, group_size)
    return q.to(integer_dtype(qmin, qmax))


def dequantize_affine(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` as float32, with the same ``axis``/``group_size`` as quantize."""
    qf = q.float()
    s, zp = _broadcast_qparams(qf, scale, zero_point, axis, group_size)
    if group_size is None:
        return (qf - zp) * s
    return ((_group_view(qf, group_size) - zp) * s).reshape(q.shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable by the straight-through estimator.

    The gradient to ``x`` is passed unchanged where ``round(x / scale) + zero_point`` lies in
    ``[qmin, qmax]`` and is zero where the value was clipped (as ``torch.fake_quantize_*``
    does). ``scale`` and ``zero_point`` are treated as constants; use ``lsq_fake_quantize``
    to learn the scale.
    """
    _check_qrange(qmin, qmax)
    return _FakeQuantizeSTE.apply(x, scale, zero_point, qmin, qmax, axis, group_size)


def lsq_grad_scale(n_elements: int, qmax: int) -> float:
    """LSQ's recommended scale-gradient factor ``1 / sqrt(n_elements * qmax)`` (Esser et al. 2020, sec. 2.2).

    ``n_elements`` is the number of values sharing one scale: the whole weight tensor for a
    per-tensor scale, one channel's elements for per-channel scales, the features of one
    sample for activations.
    """
    if n_elements < 1 or qmax < 1:
        raise ConfigError(f"lsq_grad_scale: n_elements={n_elements}, qmax={qmax} must both be >= 1")
    return 1.0 / math.sqrt(n_elements * qmax)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    *,
    qmin: int,
    qmax: int,
    grad_scale: float,
    axis: int | None = None,
) -> torch.Tensor:
    """Learned Step Size Quantization: ``round(clamp(x / scale, qmin, qmax)) * scale``.

    Gradients (Esser et al. 2020, eq. 3): to ``x`` 1 inside the range and 0 where clipped;
    to ``scale`` ``round(x/s) - x/s`` inside and ``qmin``/``qmax`` where clipped, multiplied by
    ``grad_scale`` (see ``lsq_grad_scale``) so the step size learns at the weights' pace.
    There is no zero point, as in the paper: use ``qrange(bits, True)`` for weights and
    ``qrange(bits, False)`` for non-negative activations. ``scale`` must stay positive; the
    caller (QAT) owns that, e.g. by clamping it after each optimizer step.
    """
    _check_qrange(qmin, qmax)
    s = scale
    if axis is not None:
        s = _per_axis_view(scale, x, _normalize_axis(axis, x.dim()))
    elif scale.numel() != 1:
        raise ConfigError(
            f"scale: shape {list(scale.shape)} has {scale.numel()} entries but no axis was given; "
            "pass axis= for per-channel scales or a single-element scale"
        )
    # Forward value is s, backward gradient is grad_scale * d/ds (the paper's gradscale trick).
    s = (s - s * grad_scale).detach() + s * grad_scale
    v = torch.clamp(x / s, qmin, qmax)
    # Round in the forward pass, identity in the backward pass (straight-through).
    v = (torch.round(v) - v).detach() + v
    return v * s


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - approx)^2))`` in dB.

    ``inf`` when ``approx`` equals ``reference`` exactly. Computed in float64 so that tiny
    errors in large tensors are not lost to float32 accumulation.
    """
    if reference.shape != approx.shape:
        raise ConfigError(
            f"sqnr_db: reference shape {list(reference.shape)} differs from approx shape "
            f"{list(approx.shape)}; compare a tensor with its own quantized copy"
        )
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def integer_dtype(qmin: int, qmax: int) -> torch.dtype:
    """Smallest torch integer dtype holding ``qmin..qmax``."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= -(2 ** 15) and qmax < 2 ** 15:
        return torch.int16
    return torch.int32


# ---------------------------------------------------------------- private helpers


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, group_size):
        xf = x.float()
        s, zp = _broadcast_qparams(xf, scale, zero_point, axis, group_size)
        if group_size is not None:
            xf = _group_view(xf, group_size)
        unclamped = torch.round(xf / s) + zp
        inside = (unclamped >= qmin) & (unclamped <= qmax)
        out = (torch.clamp(unclamped, qmin, qmax) - zp) * s
        ctx.save_for_backward(inside.reshape(x.shape))
        return out.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None, None, None


def _quantize_float(x, scale, zero_point, qmin, qmax, axis, group_size) -> torch.Tensor:
    s, zp = _broadcast_qparams(x, scale, zero_point, axis, group_size)
    if group_size is not None:
        return torch.clamp(torch.round(_group_view(x, group_size) / s) + zp, qmin, qmax).reshape(x.shape)
    return torch.clamp(torch.round(x / s) + zp, qmin, qmax)


def _broadcast_qparams(x, scale, zero_point, axis, group_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scale and zero point shaped to broadcast against ``x`` (or its group view)."""
    scale = scale.float()
    zero_point = zero_point.float()
    if scale.shape != zero_point.shape:
        raise ConfigError(
            f"zero_point: shape {list(zero_point.shape)} differs from scale shape {list(scale.shape)}; "
            "pass the pair returned by one choose_qparams call"
        )
    if axis is not None and group_size is not None:
        raise ConfigError("axis and group_size were both given; pass axis= for per-channel or group_size= for per-group")
    if group_size is not None:
        _check_group_size(group_size, x)
        want = [x.shape[0], x.numel() // x.shape[0] // group_size]
        if list(scale.shape) != want:
            raise ConfigError(
                f"scale: shape {list(scale.shape)} does not match per-group shape {want} for x of shape "
                f"{list(x.shape)} and group_size={group_size}; use choose_qparams with the same group_size"
            )
        return scale.unsqueeze(-1), zero_point.unsqueeze(-1)
    if axis is not None:
        axis = _normalize_axis(axis, x.dim())
        return _per_axis_view(scale, x, axis), _per_axis_view(zero_point, x, axis, "zero_point")
    if scale.numel() != 1:
        raise ConfigError(
            f"scale: shape {list(scale.shape)} has {scale.numel()} entries but neither axis nor group_size was "
            "given; pass axis= for per-channel qparams or group_size= for per-group ones"
        )
    return scale.reshape(()), zero_point.reshape(())


def _per_axis_view(t: torch.Tensor, x: torch.Tensor, axis: int, name: str = "scale") -> torch.Tensor:
    if t.dim() != 1 or t.numel() != x.shape[axis]:
        raise ConfigError(
            f"{name}: shape {list(t.shape)} does not match x.shape[{axis}] = {x.shape[axis]} for x of shape "
            f"{list(x.shape)}; per-channel qparams need one entry per index along axis {axis}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, n_groups, group_size]`` view of the 2-D ``[shape[0], -1]`` layout."""
    return x.reshape(x.shape[0], -1, group_size)


def _check_group_size(group_size: int | None, x: torch.Tensor) -> int:
    if group_size is None:
        raise ConfigError("group_size: missing; per_group granularity needs e.g. group_size=32")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size: {group_size!r} must be a positive integer such as 32 or 128")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ConfigError(f"x: shape {list(x.shape)} has no rows to split into groups; per_group needs dim >= 1")
    row_len = x.numel() // x.shape[0]
    if row_len % group_size != 0:
        divisors = [d for d in range(2, row_len + 1) if row_len % d == 0][-3:]
        raise ConfigError(
            f"group_size: {group_size} does not divide the row length {row_len} (dimension 1 of the "
            f"[{x.shape[0]}, {row_len}] view of shape {list(x.shape)}); choose a divisor of {row_len}"
            + (f" such as {', '.join(map(str, divisors))}" if divisors else "")
        )
    return group_size


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError(f"bits: {bits!r} is not an integer; use 8 for int8 or 4 for int4")
    if not 2 <= bits <= 8:
        raise ConfigError(f"bits: {bits} is outside 2..8; use 8 for int8 or 4 for int4 weights")


def _check_qrange(qmin: int, qmax: int) -> None:
    if not qmin < qmax:
        raise ConfigError(f"qmin/qmax: {qmin}..{qmax} is empty; use qrange(bits, symmetric) to get a valid pair")


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ConfigError(f"axis: {axis} is out of range for a {ndim}-D tensor; use 0 for output channels")
    return axis % ndim


__all__ = [
    "GRANULARITIES",
    "DEFAULT_EPS",
    "qrange",
    "choose_qparams",
    "quantize_affine",
    "dequantize_affine",
    "fake_quantize",
    "lsq_grad_scale",
    "lsq_fake_quantize",
    "sqnr_db",
    "integer_dtype",
]
