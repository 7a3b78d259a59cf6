"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2, empirical variant),
and the fidelity check that keeps a post-training repair only when it helps.

Quantizing weights and activations shifts each layer's expected output: ``E[W_q x_q] != E[W x]``.
Over calibration data, ``bias += E[y_float] - E[y_quant]`` per output channel, each layer
measured after the layers before it were corrected (a correction changes every later layer's
input). That order once cost two whole-model passes per layer (minutes on a deep net); now it
is four passes whatever the depth, each batched: the float graph and the uncorrected int8 graph
with a tap after every conv/linear (a temporary graph node that sums its input per channel),
one layer-major pass that corrects every layer in order (``correct_layer_by_layer``), and one
pass to measure the result (the cross-validated check below adds, per fold, a float pass, a
correcting pass and a measuring pass on half the samples). The correction is a change of the float bias that XNNPACK and ONNX
Runtime read at export, so it reaches the runtime.

``output_fidelity`` / ``no_worse``: top-1 agreement (for ``[N, classes]`` outputs) and SQNR of a
quantized model's outputs against the float ones on the calibration samples; bias correction
and cross-layer equalization are each kept only if neither gets worse.

The correction is fitted to the samples, so its fidelity on them flatters it: one bias per
channel, and a classifier's last layer has ten, estimated from a few hundred samples. It is
therefore also judged cross-validated (``_cross_validated``): fitted on one half of the
calibration samples and scored on the other, both ways round, the two scored halves pooled. It
is kept only if neither check says it lowers fidelity; with a single calibration sample there
are no halves and only the first check runs.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.fx import GraphModule

from deepshrink.core import samples as S
from deepshrink.core.progress import progress
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.graph_passes import bias_node, get_attr_tensor, set_attr_tensor, weighted_nodes
from deepshrink.quantization.quantizer import LINEAR_TARGETS, layer_name

log = logging.getLogger(__name__)

_TAP = "_deepshrink_channel_tap"


def calibration_batches(data: DataSplits, samples: int, batch_size: int = 128) -> list[torch.Tensor]:
    return data.batches("calib", samples=samples, batch_size=batch_size)


class _ChannelSums(nn.Module):
    """A graph tap: adds its input's per-channel sums (over every other dim) to ``sums[name]``."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def forward(self, value: torch.Tensor, name: str, dim: int) -> None:
        dim = dim % value.dim()
        # summed now, before a later in-place op (ReLU6(inplace=True) is hardtanh_) rewrites it
        total = value.detach().sum(dim=[d for d in range(value.dim()) if d != dim], dtype=torch.float64)
        self.sums[name] = self.sums.get(name, 0) + total
        self.counts[name] = self.counts.get(name, 0) + value.numel() // value.shape[dim]


@torch.no_grad()
def channel_means(gm: GraphModule, batches: list, names: list[str], *, desc: str = "channel means") -> tuple[dict[str, torch.Tensor], list]:
    """Mean of each named conv/linear node's output per channel (dim 1 for convs, the last for
    linears) over all samples and positions, in one batched pass; also the model's outputs."""
    taps = _ChannelSums()
    gm.add_module(_TAP, taps)
    nodes = {n.name: n for n in gm.graph.nodes}
    inserted = []
    try:
        for name in names:
            node = nodes[name]
            with gm.graph.inserting_after(node):
                inserted.append(gm.graph.call_module(_TAP, (node,), {"name": name, "dim": -1 if node.target in LINEAR_TARGETS else 1}))
        gm.recompile()
        outputs = [S.call(gm, x) for x in progress(batches, desc)]
    finally:
        for tap in inserted:
            gm.graph.erase_node(tap)
        delattr(gm, _TAP)
        gm.recompile()
    return {name: (taps.sums[name] / taps.counts[name]).float() for name in taps.sums}, outputs


def output_fidelity(expected: list, outputs: list) -> dict:
    """``{agreement, sqnr_db}`` of ``outputs`` against ``expected`` (lists of per-batch model
    outputs): top-1 agreement of the first output when it is ``[N, classes]`` (else ``None``), and
    the SQNR over every floating output tensor."""
    # batch by batch: samples of different lengths (token ids, audio frames) give outputs of different shapes
    signal = noise = 0.0
    agree = counted = 0
    classifier = True
    for ref_batch, out_batch in zip(expected, outputs):
        ref, out = S.flatten(ref_batch), S.flatten(out_batch)
        for r, o in zip(ref, out):
            if r.is_floating_point():
                r, o = r.double(), o.double()
                signal += float((r ** 2).sum())
                noise += float(((r - o) ** 2).sum())
        first = ref[0] if ref else None
        if first is None or not (first.is_floating_point() and first.dim() == 2 and first.shape[1] > 1):
            classifier = False
            continue
        agree += int((first.argmax(1) == out[0].argmax(1)).sum())
        counted += first.shape[0]
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    agreement = agree / counted if classifier and counted else None
    return {"agreement": agreement, "sqnr_db": sqnr}


def no_worse(candidate: dict, baseline: dict) -> bool:
    """Whether ``candidate``'s fidelity is nowhere below ``baseline``'s: agreement (where there is
    one) and SQNR both at least as high. Both, because 256 samples move agreement in steps of
    0.4 %: a repair that wins one sample while its SQNR falls is noise on held-out data."""
    a, b = candidate["agreement"], baseline["agreement"]
    return (a is None or b is None or a >= b) and candidate["sqnr_db"] >= baseline["sqnr_db"]


def describe_fidelity(f: dict) -> str:
    agreement = "" if f["agreement"] is None else f"top-1 agreement {100 * f['agreement']:.2f} %, "
    return f"{agreement}SQNR {f['sqnr_db']:.1f} dB"


def correct_bias(quantized: GraphModule, reference: GraphModule, batches: list, *, expected: list | None = None) -> dict:
    """Correct ``quantized``'s conv/linear biases in place toward ``reference`` (the float graph
    it was quantized from, same node names), keeping the correction only if the output fidelity
    against ``expected`` (default: ``reference``'s outputs) on ``batches`` does not drop, neither
    fitted on all of them nor fitted on each half and scored on the other.

    Returns ``{kept, fidelity_before, fidelity_after, fidelity_held_out_before,
    fidelity_held_out_after, layers}`` (the held-out pair ``None`` without two halves, see the
    module docstring); ``layers`` has ``{layer, node,
    mean_abs_shift_before, mean_abs_shift_after}`` per layer: the mean over channels of
    ``|E[y_float] - E[y_quant]|`` without and with the correction (measured whatever was kept).
    """
    reference_names = {n.name for n in weighted_nodes(reference)}
    layers = [n for n in weighted_nodes(quantized) if _is_quantized(n) and n.name in reference_names]
    names = [n.name for n in layers]
    target, reference_outputs = channel_means(reference, batches, names, desc="bias correction: float reference")
    expected = reference_outputs if expected is None else expected
    before, uncorrected = channel_means(quantized, batches, names, desc="bias correction: int8 before")
    biases = {n.name: bias_node(quantized, n, create=True) for n in layers}
    original = {name: get_attr_tensor(quantized, node).detach().clone() for name, node in biases.items()}
    folds = _folds(batches, expected, uncorrected)
    held_out = None if folds is None else _cross_validated(quantized, reference, folds, names, biases, original)
    correct_layer_by_layer(quantized, batches, target, biases)
    after, corrected = channel_means(quantized, batches, names, desc="bias correction: int8 after")
    fidelity_before, fidelity_after = output_fidelity(expected, uncorrected), output_fidelity(expected, corrected)
    kept = no_worse(fidelity_after, fidelity_before) and (held_out is None or no_worse(held_out["after"], held_out["before"]))
    if not kept:
        _restore(quantized, biases, original)
    log.info("bias correction %s: int8 %s with it, %s without, on %d calibration samples%s",
             "kept" if kept else "dropped (it lowered fidelity)", describe_fidelity(fidelity_after), describe_fidelity(fidelity_before),
             sum(S.batch_size(x) for x in batches),
             "" if held_out is None else f"; fitted on one half and scored on the other: {describe_fidelity(held_out['after'])} "
                                         f"with it, {describe_fidelity(held_out['before'])} without")
    return {
        "kept": kept, "fidelity_before": fidelity_before, "fidelity_after": fidelity_after,
        "fidelity_held_out_before": None if held_out is None else held_out["before"],
        "fidelity_held_out_after": None if held_out is None else held_out["after"],
        "layers": [{
            "layer": layer_name(layer), "node": layer.name,
            "mean_abs_shift_before": float((target[layer.name] - before[layer.name]).abs().mean()),
            "mean_abs_shift_after": float((target[layer.name] - after[layer.name]).abs().mean()),
        } for layer in layers],
    }


def _folds(batches: list, *outputs: list) -> list[tuple[list, ...]] | None:
    """The calibration samples in two disjoint halves, ``(batches, *outputs)`` each (``outputs``:
    per-batch model outputs on ``batches``, split the same way): every other batch, or the two
    halves of a lone batch; ``None`` for a single sample."""
    if len(batches) >= 2:
        return [tuple(x[k::2] for x in (batches, *outputs)) for k in (0, 1)]
    n = S.batch_size(batches[0])
    if n < 2:
        return None
    half = n // 2

    def rows(out, start: int, stop: int):   # a model's outputs: the tensors that carry the batch
        return S.map_tensors(lambda t: t[start:stop] if t.dim() and t.shape[0] == n else t, out)
    return [([S.take(batches[0], start, stop)], *([rows(o[0], start, stop)] for o in outputs))
            for start, stop in ((0, half), (half, n))]


def _cross_validated(quantized: GraphModule, reference: GraphModule, folds: list, names: list[str], biases: dict,
                     original: dict) -> dict:
    """``{before, after}``: the output fidelity without and with a correction fitted on the other
    fold, over both folds pooled (``folds``: ``(batches, expected, uncorrected outputs)`` each).
    ``quantized`` is left with its ``original`` biases."""
    expected, before, after = [], [], []
    for k, ((fit, _, _), (score, score_expected, score_before)) in enumerate(((folds[0], folds[1]), (folds[1], folds[0]))):
        target = channel_means(reference, fit, names, desc=f"bias correction: float reference, fold {k + 1} of 2")[0]
        correct_layer_by_layer(quantized, fit, target, biases)
        after += channel_means(quantized, score, [], desc=f"bias correction: held-out half, fold {k + 1} of 2")[1]
        _restore(quantized, biases, original)
        expected += score_expected
        before += score_before
    return {"before": output_fidelity(expected, before), "after": output_fidelity(expected, after)}


def _restore(gm: GraphModule, biases: dict, original: dict) -> None:
    for name, node in biases.items():
        set_attr_tensor(gm, node, original[name])


@torch.no_grad()
def correct_layer_by_layer(gm: GraphModule, batches: list, target: dict[str, torch.Tensor], biases: dict) -> None:
    """``bias += target - mean`` for each node named in ``target`` (``biases``: its bias
    ``get_attr`` node), measured after every layer before it was corrected, in one pass: each
    node runs on every batch before the next node does (layer-major), and a layer's outputs get
    its shift added at once, exactly what its corrected bias gives. Memory: the live values of
    all the batches at once (one batch of every calibration sample)."""
    interpreter = torch.fx.Interpreter(gm)
    chunks = [S.flatten(x) for x in batches]
    order = list(gm.graph.nodes)
    last_use = {arg: i for i, node in enumerate(order) for arg in node.all_input_nodes}
    env: dict = {}
    placeholders = 0
    for i, node in enumerate(progress(order, "bias correction: layer by layer")):
        if node.op == "placeholder":
            env[node] = [c[placeholders] for c in chunks]
            placeholders += 1
        elif node.op == "get_attr":
            env[node] = [interpreter.fetch_attr(node.target)] * len(chunks)
        elif node.op == "output":
            break
        else:
            run = getattr(interpreter, node.op)
            env[node] = [run(node.target, *torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n][c])) for c in range(len(chunks))]
            if node.name in target:
                _shift_outputs(gm, node, env[node], target[node.name], biases[node.name])
        for arg in node.all_input_nodes:
            if last_use[arg] == i:
                del env[arg]


def _shift_outputs(gm: GraphModule, node, values: list[torch.Tensor], target: torch.Tensor, bias) -> None:
    taps = _ChannelSums()
    dim = -1 if node.target in LINEAR_TARGETS else 1
    for value in values:
        taps(value, node.name, dim)
    shift = (target - (taps.sums[node.name] / taps.counts[node.name]).float())
    old = get_attr_tensor(gm, bias)
    set_attr_tensor(gm, bias, old + shift.to(old.dtype))
    for value in values:
        shape = [1] * value.dim()
        shape[dim] = -1
        value.add_(shift.to(value.dtype).reshape(shape))


def _is_quantized(layer) -> bool:
    weight = layer.args[1]
    return weight.op == "call_function" and "dequantize" in str(weight.target)
