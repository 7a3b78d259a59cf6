"""What an int8 graph computes on x86 ONNX Runtime without VNNI, on any CPU.

``emulate_x86_without_vnni(graph, inputs)`` runs a converted PT2E graph with every quantized
conv / linear replaced by the integer arithmetic of ONNX Runtime's u8 x s8 GEMM on AVX2
(``ops.int_kernels``: product pairs summed into a saturating int16). Inputs are quantized as
the graph quantizes them; int8 activations enter the kernel as ``code + 128`` (ORT's u8 path),
uint8 ones as they are. The correction ``(saturated - exact) * s_x * s_w`` is added to the float
conv output, so the rest of the graph (requantization, later layers) sees what the kernel would
have produced. A VNNI machine cannot show the saturation; this shows it on every machine.

What it models, and what not:
- GEMM-based convs and linears; the reduction axis of a conv is laid out as ONNX Runtime's
  NHWC im2col does (kernel row, kernel column, input channel — channel fastest).
- u8 x u8 weights (``u8u8`` layout) run a widening kernel: never saturated. Depthwise convs run
  MLAS's depthwise kernel, which accumulates in int32: never saturated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Interpreter, Node

import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

from deepshrink.ops.int_kernels import pair_peaks, u8s8_dot

_QD = torch.ops.quantized_decomposed
# static graphs only: a dynamic graph's ONNX (``quantization/onnx_ops.py``) runs DequantizeLinear and a
# float MatMul in ONNX Runtime — measured 1e-5 from the module — so no int8 kernel can saturate there
_DEQUANT_TENSOR = (_QD.dequantize_per_tensor.default,)
_DEQUANT_WEIGHT = (_QD.dequantize_per_channel.default, _QD.dequantize_per_tensor.default)
_LINEAR = (torch.ops.aten.linear.default,)
_CONV = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default)


@dataclass
class SaturationReport:
    """Per layer node: pair sums computed and pair sums that left int16."""

    pairs: dict[str, int] = field(default_factory=dict)
    saturated: dict[str, int] = field(default_factory=dict)
    # per layer node, per output channel: the largest |pair sum| seen (``peaks=True`` only;
    # layers whose kernel accumulates in int32 — depthwise, u8 x u8 — have none)
    peaks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total_saturated(self) -> int:
        return sum(self.saturated.values())

    @property
    def total_pairs(self) -> int:
        return sum(self.pairs.values())

    def as_dict(self) -> dict:
        return {"total_pairs": self.total_pairs, "total_saturated": self.total_saturated,
                "saturated_by_layer": {k: v for k, v in self.saturated.items() if v}}


def _quantized_operands(node: Node):
    """``(activation dequant node, weight dequant node)`` when ``node`` is an int8 conv/linear."""
    if node.op != "call_function" or node.target not in _LINEAR + _CONV:
        return None
    x, w = node.args[0], node.args[1]
    if not (isinstance(x, Node) and x.target in _DEQUANT_TENSOR and isinstance(w, Node) and w.target in _DEQUANT_WEIGHT):
        return None
    return x, w


class _Emulator(Interpreter):
    def __init__(self, gm: GraphModule, report: SaturationReport, saturate: bool, peaks: int | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)   # the codes behind each dequantize are read back
        self.report, self.saturate, self.peaks = report, saturate, peaks

    def run_node(self, n: Node):
        out = super().run_node(n)
        operands = _quantized_operands(n)
        if operands is not None:
            out = out + self._correction(n, *operands, out)
        return out

    def _correction(self, node: Node, x_dq: Node, w_dq: Node, out: torch.Tensor) -> torch.Tensor:
        codes = self.env[x_dq.args[0]]
        x_scale, x_zp, act_dtype = float(self._value(x_dq.args[1])), int(self._value(x_dq.args[2])), x_dq.args[5]
        w_codes = self.env[w_dq.args[0]]
        w_dtype = w_dq.args[-1]
        if w_dtype == torch.uint8 or act_dtype not in (torch.int8, torch.uint8):
            self.report.pairs[node.name] = 0
            self.report.saturated[node.name] = 0
            return torch.zeros((), dtype=out.dtype)
        shift = 128 if act_dtype == torch.int8 else 0
        a_u8, zp_u8 = codes.to(torch.int32) + shift, x_zp + shift
        w_scale = self.env[w_dq.args[1]] if w_dq.target == _QD.dequantize_per_channel.default else torch.tensor([float(w_dq.args[1])])
        if node.target in _LINEAR:
            a = a_u8.reshape(-1, a_u8.shape[-1])
            w = w_codes.reshape(w_codes.shape[0], -1)
            delta, pairs, clipped = self._delta(a, w)
            self._peak(node.name, [pair_peaks(a, w, above=self.peaks)] if self.peaks is not None else None)
            self.report.pairs[node.name] = self.report.pairs.get(node.name, 0) + pairs
            self.report.saturated[node.name] = self.report.saturated.get(node.name, 0) + clipped
            correction = delta.to(out.dtype) * x_scale * w_scale.reshape(1, -1).to(out.dtype)
            return correction.reshape(out.shape)
        return self._conv_correction(node, a_u8, zp_u8, w_codes, x_scale, w_scale, out)

    def _peak(self, name: str, parts: list[torch.Tensor] | None) -> None:
        if parts is None:
            return
        peak = torch.cat(parts)
        seen = self.report.peaks.get(name)
        self.report.peaks[name] = peak if seen is None else torch.maximum(seen, peak)

    def _value(self, arg):
        value = self.env[arg] if isinstance(arg, Node) else arg
        return value.reshape(-1)[0].item() if isinstance(value, torch.Tensor) else value

    def _delta(self, a: torch.Tensor, w: torch.Tensor):
        if self.peaks is not None and not self.saturate:   # peaks alone: no per-pair count (the costly part)
            return torch.zeros((a.shape[0], w.shape[0]), dtype=torch.int64), 0, 0
        exact, clipped = u8s8_dot(a, w, saturate_pairs=False)
        if clipped and self.saturate:
            saturated, _ = u8s8_dot(a, w, saturate_pairs=True)
            delta = saturated - exact
        else:
            delta = torch.zeros_like(exact)
        return delta, exact.numel() * ((a.shape[1] + 1) // 2), clipped

    def _conv_correction(self, node, a_u8, zp_u8, w_codes, x_scale, w_scale, out):
        args = list(node.args) + [None] * (7 - len(node.args))
        one_d = node.target == torch.ops.aten.conv1d.default
        if one_d:
            a_u8, w_codes, out_view = a_u8.unsqueeze(2), w_codes.unsqueeze(2), out.unsqueeze(2)
        else:
            out_view = out
        pair = lambda v, d: tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) and v else (d, d)  # noqa: E731
        stride, padding, dilation = pair(args[3], 1), args[4], pair(args[5], 1)
        groups = args[6] or 1
        if isinstance(padding, str):
            return torch.zeros((), dtype=out.dtype)   # "same"/"valid" padding: not modelled
        padding = pair(padding, 0)
        if one_d:
            stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
        n, c, _, _ = a_u8.shape
        m, cg, kh, kw = w_codes.shape
        if groups > 1 and cg == 1:
            self.report.pairs[node.name] = 0
            self.report.saturated[node.name] = 0
            return torch.zeros((), dtype=out.dtype)   # depthwise: int32-accumulating kernel
        # im2col of the codes; padded positions hold the zero point, as ORT pads
        cols = F.unfold((a_u8 - zp_u8).to(torch.float32), (kh, kw), dilation=dilation, padding=padding, stride=stride)
        cols = cols.round().to(torch.int32) + zp_u8                       # [N, C*kh*kw, L]
        length = cols.shape[-1]
        cols = cols.reshape(n, groups, cg, kh * kw, length).permute(0, 1, 4, 3, 2).reshape(n, groups, length, kh * kw * cg)
        weights = w_codes.reshape(groups, m // groups, cg, kh * kw).permute(0, 1, 3, 2).reshape(groups, m // groups, kh * kw * cg)
        deltas, peaks, total_pairs, total_clipped = [], [], 0, 0
        for g in range(groups):
            rows = cols[:, g].reshape(n * length, -1)
            delta, pairs, clipped = self._delta(rows, weights[g])
            deltas.append(delta.reshape(n, length, m // groups))
            total_pairs, total_clipped = total_pairs + pairs, total_clipped + clipped
            if self.peaks is not None:
                peaks.append(pair_peaks(rows, weights[g], above=self.peaks))
        self._peak(node.name, peaks if self.peaks is not None else None)
        self.report.pairs[node.name] = self.report.pairs.get(node.name, 0) + total_pairs
        self.report.saturated[node.name] = self.report.saturated.get(node.name, 0) + total_clipped
        delta = torch.cat(deltas, dim=2).permute(0, 2, 1).reshape(out_view.shape).to(out.dtype)
        correction = delta * x_scale * w_scale.reshape(1, -1, 1, 1).to(out.dtype)
        return correction.squeeze(2) if one_d else correction


def emulate_x86_without_vnni(gm: GraphModule, inputs, *, saturate: bool = True, peaks: int | None = None):
    """The graph's output (a tensor, or a tuple for several) as ONNX Runtime's AVX2 u8 x s8
    kernels would compute it, and the count of saturated pair sums per layer. ``inputs`` is a
    ``core.samples`` batch. ``saturate=False`` gives the exact (VNNI) arithmetic with the same counts.
    ``peaks=N`` records each output channel's largest |pair sum| (``SaturationReport.peaks``), exact
    where above N (``ops.int_kernels.pair_peaks``); with ``saturate=False`` it then skips the per-pair
    counts (``pairs``/``saturated`` stay 0) and returns the exact arithmetic."""
    from deepshrink.core import samples as S
    from deepshrink.core.outputs import output_tensors

    report = SaturationReport()
    emulator = _Emulator(gm, report, saturate, peaks)
    with torch.no_grad():
        flat = output_tensors(emulator.run(*S.flatten(inputs)))
    return (flat[0] if len(flat) == 1 else flat), report


def count_saturations(gm: GraphModule, inputs: torch.Tensor) -> SaturationReport:
    """Pair sums that would leave int16 in ONNX Runtime's x86 u8 x s8 GEMM without VNNI."""
    return emulate_x86_without_vnni(gm, inputs, saturate=False)[1]
