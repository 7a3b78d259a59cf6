"""Full 8-bit weights wherever x86 ONNX Runtime cannot clip them, 7 bits only where it measurably can.

ONNX Runtime's u8 x s8 GEMM on x86 without VNNI adds each adjacent pair of products into a
saturating int16 (``ops.int_kernels``). The blanket fix — every weight in [-63, 63]
(``reduce_range``, the ``*-reduced`` layouts) — costs every layer a bit, although depthwise
convs (int32-accumulating kernel) never saturate and many 1x1 channels never come close. On the
zoo's mobile-cnn (``bench/results/repairs.md``) the guarded ``.onnx`` agrees with fp32 on 99.13 %
of the Fashion-MNIST test set, the 7-bit one on 98.95 %.

``guard_weight_range`` keeps the int8 range per *output channel* and narrows only the channels
that need it: it runs the converted graph's integer arithmetic on the calibration samples
(``quantization.saturation``, exact, on any CPU), reads each channel's largest |pair sum|, and
re-quantizes from the float weights every channel whose peak passes ``margin`` x 32,767 to
[-63, 63] with a scale 127/63 larger — which cannot saturate whatever the input. Narrowing a
channel changes the activations after it, so it measures again until no channel is left above the
limit.

The default margin is 1.0: narrow exactly the channels that saturated on a calibration sample. A
lower one buys little headroom: one product of a full activation code and a channel's largest
weight code is already 255 x 127 = 32,385, 0.988 of int16, so below that every channel that meets
a full activation is narrowed. What a guarded layout does not promise: an input far outside the
calibration samples may still clip a full-range channel on an x86 CPU without VNNI; the export
checks its own samples through the same emulation.

The narrowed channels are the int8 layouts ``*-guarded`` (``core.targets``); the export's parity
check emulates the kernel again on the export samples (``deploy.api``).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from deepshrink.core.progress import progress
from deepshrink.ops.int_kernels import INT16_MAX
from deepshrink.quantization.graph_passes import get_attr_tensor, set_attr_tensor, weighted_nodes
from deepshrink.quantization.quantizer import layer_name

DEFAULT_MARGIN = 1.0
FULL, NARROW = 127, 63
_QD = torch.ops.quantized_decomposed
_MAX_ROUNDS = 4
_MASKS = "_deepshrink_narrowed"   # on the graph: node name -> bool mask of its 7-bit channels


def float_weights(gm: GraphModule) -> dict[str, torch.Tensor]:
    """Each conv/linear node's float weight (by node name, which ``prepare``/``convert`` keep), taken
    before quantization: narrowed channels are re-quantized from these, not from int8 codes."""
    out = {}
    for node in weighted_nodes(gm):
        weight = node.args[1]
        if isinstance(weight, Node) and weight.op == "get_attr":
            out[node.name] = get_attr_tensor(gm, weight).detach().clone()
    return out


def guard_weight_range(converted: GraphModule, weights: dict[str, torch.Tensor] | None, batches: list, *,
                       margin: float = DEFAULT_MARGIN) -> dict:
    """Narrow to 7 bits the weight channels of ``converted`` whose u8 x s8 pair sums pass
    ``margin`` x int16 on ``batches``; returns what it did (plain data, for the quantize report):
    ``{margin, rounds, layers: {node: {channels, narrowed, peak}}, narrowed, channels, peak_after}``."""
    from deepshrink.quantization.saturation import emulate_x86_without_vnni

    limit = int(margin * INT16_MAX)
    weights = weights or {}
    layers: dict[str, dict] = {}
    peaks: dict[str, torch.Tensor] = {}
    rounds = 0
    for rounds in range(1, _MAX_ROUNDS + 1):
        peaks = _peaks(converted, batches, emulate_x86_without_vnni, above=limit, desc=f"saturation check {rounds}")
        changed = 0
        for name, peak in peaks.items():
            node = _node(converted, name)
            over = (peak > limit) & ~_narrowed(converted, node)
            if not bool(over.any()):
                continue
            changed += _narrow(converted, node, weights.get(name), over)
            entry = layers.setdefault(name, {"layer": layer_name(node), "channels": int(peak.numel()), "narrowed": 0,
                                             "peak": int(peak.max())})
            entry["narrowed"] = int(_narrowed(converted, node).sum())
        if not changed:
            break
        converted.recompile()
    peak_after = max((int(p.max()) for p in peaks.values() if p.numel()), default=0)
    return {
        "margin": margin, "rounds": rounds, "layers": layers,
        "narrowed": sum(e["narrowed"] for e in layers.values()),
        "channels": sum(int(p.numel()) for p in peaks.values()),
        "peak_after": peak_after, "int16_max": INT16_MAX,
    }


def weight_range_line(record: dict) -> str:
    """One line for the log and the report: how many weight channels went to 7 bits, and why."""
    if not record["narrowed"]:
        return (f"saturation guard: no weight channel's u8 x s8 pair sums came near int16 on the calibration samples "
                f"(peak {record['peak_after']:,} of {record['int16_max']:,}): 8-bit weights everywhere")
    return (f"saturation guard: {record['narrowed']:,} of {record['channels']:,} weight channels narrowed to 7 bits in "
            f"{len(record['layers'])} layer{'' if len(record['layers']) == 1 else 's'} (their u8 x s8 pair sums passed int16 on the calibration samples, which "
            f"x86 ONNX Runtime without VNNI would clip; peak after {record['peak_after']:,}); each keeps half the "
            "resolution: if fidelity falls short, mixed_precision can keep the layers that cost it in float")


def narrowed_channels(gm: GraphModule, layer: str) -> torch.Tensor | None:
    """The bool mask of ``layer``'s (a node name) output channels narrowed to 7 bits, or ``None``:
    what a later rounding repair must keep within [-63, 63]."""
    return getattr(gm, _MASKS, {}).get(layer)


def merge_reports(first: dict, second: dict) -> dict:
    """One report of two guard passes over the same graph (the second after a rounding repair)."""
    layers = {**first["layers"], **second["layers"]}
    return {**second, "rounds": first["rounds"] + second["rounds"], "layers": layers,
            "narrowed": sum(e["narrowed"] for e in layers.values())}


def _peaks(gm: GraphModule, batches: list, emulate, *, above: int, desc: str) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for batch in progress(batches, desc):
        _, report = emulate(gm, batch, saturate=False, peaks=above)
        for name, peak in report.peaks.items():
            merged[name] = peak if name not in merged else torch.maximum(merged[name], peak)
    return merged


def _node(gm: GraphModule, name: str) -> Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _dequant(layer: Node) -> Node:
    weight = layer.args[1]
    if not (isinstance(weight, Node) and weight.target in (_QD.dequantize_per_channel.default, _QD.dequantize_per_tensor.default)):
        raise ValueError(f"{layer.name}: its weight is not a dequantized int8 constant")
    return weight


def _narrowed(gm: GraphModule, layer: Node) -> torch.Tensor:
    """Output channels of ``layer`` already at 7 bits."""
    masks = getattr(gm, _MASKS, {})
    if layer.name in masks:
        return masks[layer.name].clone()
    return torch.zeros(int(get_attr_tensor(gm, _dequant(layer).args[0]).shape[0]), dtype=torch.bool)


def _narrow(gm: GraphModule, layer: Node, weight: torch.Tensor | None, channels: torch.Tensor) -> int:
    """Re-quantize ``channels`` of ``layer``'s weight from ``weight`` to [-63, 63]; returns how many.
    Without a float weight (QAT: its conv-bn fold happens in ``convert``) the codes' own values are
    re-rounded, which adds up to half a full-range step of error to those channels."""
    dq = _dequant(layer)
    codes = get_attr_tensor(gm, dq.args[0]).clone()
    per_channel = dq.target == _QD.dequantize_per_channel.default
    if weight is None:
        full_scale = get_attr_tensor(gm, dq.args[1]) if per_channel else torch.tensor(float(dq.args[1]))
        weight = codes.to(torch.float32) * (full_scale.reshape((-1,) + (1,) * (codes.dim() - 1)) if per_channel else full_scale)
    w = weight.reshape(codes.shape).to(torch.float32)
    if per_channel:
        scale = get_attr_tensor(gm, dq.args[1]).clone()
        wide = scale * FULL / NARROW
        view = (-1,) + (1,) * (codes.dim() - 1)
        narrow = torch.clamp(torch.round(w / wide.reshape(view)), -NARROW, NARROW).to(codes.dtype)
        codes[channels] = narrow[channels]
        scale[channels] = wide[channels].to(scale.dtype)
        set_attr_tensor(gm, dq.args[0], codes)
        set_attr_tensor(gm, dq.args[1], scale)
        mask = _narrowed(gm, layer) | channels
    else:   # one scale for the tensor: every channel narrows together
        wide = float(dq.args[1]) * FULL / NARROW
        set_attr_tensor(gm, dq.args[0], torch.clamp(torch.round(w / wide), -NARROW, NARROW).to(codes.dtype))
        dq.args = (dq.args[0], wide, *dq.args[2:])
        mask = torch.ones(codes.shape[0], dtype=torch.bool)
    added = int((mask & ~_narrowed(gm, layer)).sum())
    object.__setattr__(gm, _MASKS, {**getattr(gm, _MASKS, {}), layer.name: mask})
    return added
