"""Mixed precision by measured sensitivity: the few int8 layers that cause the loss, kept in float.

Which layer to leave in float is usually found by trial and error, or by a proxy such as the
layer's own SQNR. Here it is measured on the quantity the user cares about — the whole model's
output against the float model on the calibration samples — one layer at a time:

- in the converted int8 graph, a layer "runs in float" when its weight is the float weight and
  its input is not rounded to int8 (the Q/DQ pair before it is bypassed); everything else stays
  as quantized (narrowed channels, AdaRound codes, corrected biases included), so one forward pass
  of the calibration samples measures what that layer's int8 costs the output;
- an op without weights whose int8 output a float op reads is a candidate too, at no bytes: a
  transformer's residual and embedding adds before a LayerNorm, whose outliers make that grid
  coarse (on the tiny BERT example three of them float: 32.61 -> 35.12 dB in both runtimes,
  ``bench/results/examples.md``); it is realized by leaving that one node unannotated (``fp32_nodes``);
- greedy: the layer whose float version raises the output SQNR most is kept float, then every
  remaining layer is measured again with it float (losses interact), until ``max_layers`` are
  chosen, no layer gains ``min_gain_db``, the next one would pass the byte budget
  (``max_growth`` x the int8 weight bytes: a float weight costs 3 bytes more per weight), or
  ``target_sqnr_db`` is reached;
- the model is then quantized again with those layers in ``fp32_layers`` (every repair re-run,
  so the other layers are calibrated and rounded for the float ones), and the result is kept only
  if its output SQNR on the calibration samples is higher than without. SQNR alone, unlike the
  repairs' guard (``bias_correction.no_worse``): a float layer removes that layer's rounding
  noise rather than trading one error for another, and top-1 agreement on a few hundred samples,
  often 100 % already, can only move down in steps of one sample (on the zoo mobile-cnn, one of
  256 flipped while the output SQNR rose 33.6 -> 37.1 dB; the kept layers then raised agreement
  on the 10,000 test images, see ``bench/results/repairs.md``). The agreement is reported beside it.

The measurement mirrors what the quantizer does with a float layer: its input stays int8 where
an int8 op produced it (the op's output is annotated with the op) and is float where it came from
the model's input or from a float layer. Where another int8 layer shares the input, the real graph
keeps the rounding the measurement drops, so a gain can be overstated a little; the final check
is on the real graph.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from deepshrink.core import samples as S
from deepshrink.core.progress import progress
from deepshrink.quantization.bias_correction import describe_fidelity, output_fidelity
from deepshrink.quantization.graph_passes import weighted_nodes
from deepshrink.quantization.quantizer import layer_name

log = logging.getLogger(__name__)

_QD = torch.ops.quantized_decomposed   # its ops exist once torchao is imported, as it is before any graph is converted


def _is_dequant(node) -> bool:
    return isinstance(node, Node) and node.target in (_QD.dequantize_per_tensor.default, _QD.dequantize_per_tensor.tensor,
                                                      _QD.dequantize_per_channel.default)


def _is_quant(node) -> bool:
    return isinstance(node, Node) and node.target in (_QD.quantize_per_tensor.default, _QD.quantize_per_tensor.tensor)

ANNOTATED = "_deepshrink_annotated"   # on a converted graph: the quantizer's Annotated
_PASS_THROUGH = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default, torch.ops.aten.hardtanh.default,
                 torch.ops.aten.hardtanh_.default, torch.ops.aten.clamp.default)
_FLOAT_ATTR = "_deepshrink_float_weight_"
_EXTRA_BYTES_PER_WEIGHT = 3   # fp32 (4 bytes) in place of an int8 code (1 byte)


@dataclass(frozen=True)
class Candidate:
    """What can be kept float: a quantized conv/linear (``kind="layer"``: its module path, node,
    and weights), or the int8 output of one op that a float op reads (``kind="output"``: a residual
    or embedding add before a LayerNorm; no bytes) — realized as ``fp32_layers`` / ``fp32_nodes``."""

    layer: str
    node: str
    weights: int
    kind: str = "layer"

    @property
    def extra_bytes(self) -> int:
        return _EXTRA_BYTES_PER_WEIGHT * self.weights


def candidates(converted: GraphModule, weights: dict[str, torch.Tensor], annotated) -> list[Candidate]:
    """Every conv/linear whose weight is a dequantized int8 constant and whose float weight is known,
    and every other op whose int8 output a float op reads (``annotated``: the quantizer's
    ``Annotated``, kept on the converted graph as ``ANNOTATED``)."""
    out = []
    for node in weighted_nodes(converted):
        weight = node.args[1]
        if _is_dequant(weight) and node.name in weights:
            out.append(Candidate(layer_name(node), node.name, int(weights[node.name].numel())))
    weighted = {n.name for n in weighted_nodes(converted)}
    for node in converted.graph.nodes:
        if not _is_quant(node) or not isinstance(node.args[0], Node):
            continue
        source = node.args[0]
        if (source.name in annotated.outputs and source.name not in weighted and source.target not in _PASS_THROUGH
                and _float_readers(node, annotated)):
            out.append(Candidate(f"{layer_name(source)} ({source.name} output)", source.name, 0, kind="output"))
    return out


def _float_readers(quant: Node, annotated) -> list[tuple[Node, Node]]:
    """``(dequantize, reader)`` pairs of ``quant``'s value where the reader takes no int8 input of its
    own: a float op, or the graph's output (the model returns what the last op computes)."""
    return [(dq, reader) for dq in quant.users if _is_dequant(dq) for reader in dq.users
            if reader.op in ("call_function", "output") and reader.name not in annotated.inputs]


@contextlib.contextmanager
def run_in_float(converted: GraphModule, chosen: list[Candidate], weights: dict[str, torch.Tensor], annotated):
    """``converted`` with the ``chosen`` layers computing in float (float weight, input not
    rounded) and the chosen outputs not rounded for their float readers, for the duration;
    restored exactly after."""
    nodes = {n.name: n for n in converted.graph.nodes}
    saved: dict[Node, tuple] = {}
    added: list[tuple[Node, str]] = []
    order = {n.name: i for i, n in enumerate(converted.graph.nodes)}

    def rewrite(node: Node, old: Node, new: Node) -> None:
        saved.setdefault(node, (node.args, node.kwargs))
        node.args, node.kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: new if a is old else a)

    # what the chosen ops produce is float now, also where the quantizer had annotated it int8
    floated = {n.name for c in chosen for n in (nodes[c.node], _fused_end(nodes[c.node]))}
    try:
        for c in sorted(chosen, key=lambda c: order[c.node]):   # a float op's own input is swapped first
            node = nodes[c.node]
            for arg in list(node.all_input_nodes):   # its inputs, where only its own annotation rounded them
                plain = _unrounded(arg, annotated, floated)
                if plain is not arg and not (c.kind == "layer" and arg is node.args[1]):
                    rewrite(node, arg, plain)
            # its int8 output (after a fused ReLU-like op), where a float op reads it: the quantizer
            # annotated that rounding with this op, so it goes with it
            end = _fused_end(node)
            quant = next((u for u in end.users if _is_quant(u)), None)
            if quant is not None:
                for dq, reader in _float_readers(quant, annotated):
                    rewrite(reader, dq, end)
            if c.kind == "output":
                continue
            attr = f"{_FLOAT_ATTR}{len(added)}"
            converted.register_buffer(attr, weights[c.node].reshape(node.args[1].meta["val"].shape)
                                      if "val" in node.args[1].meta else weights[c.node])
            with converted.graph.inserting_before(node):
                getter = converted.graph.get_attr(attr)
            added.append((getter, attr))
            rewrite(node, node.args[1], getter)
        converted.recompile()
        yield converted
    finally:
        for node, (args, kwargs) in saved.items():
            node.args, node.kwargs = args, kwargs
        for getter, attr in added:
            converted.graph.erase_node(getter)
            delattr(converted, attr)
        converted.recompile()


def _fused_end(node: Node) -> Node:
    """``node``, or the ReLU-like op right after it (its only reader) that carries the pattern's output."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _PASS_THROUGH:
        return users[0]
    return node


def _unrounded(value, annotated, floated: set[str]):
    """What a float op reads in place of ``dequantize(quantize(x))``: ``x``, unless the quantizer
    gave ``x``'s producer an int8 output (that rounding stays when its reader is float) and the
    producer is not itself ``floated``."""
    if not _is_dequant(value) or not _is_quant(value.args[0]):
        return value
    source = value.args[0].args[0]
    produced_int8 = isinstance(source, Node) and source.name in annotated.outputs and source.name not in floated
    return value if produced_int8 else source


@torch.no_grad()
def fidelity_of(gm: GraphModule, batches: list, expected: list) -> dict:
    return output_fidelity(expected, [S.call(gm, x) for x in batches])


def choose_float_layers(converted: GraphModule, weights: dict[str, torch.Tensor], batches: list, expected: list, *,
                        max_layers: int, min_gain_db: float, max_growth: float,
                        target_sqnr_db: float | None, annotated) -> dict:
    """The greedy choice (module docstring), measured on ``converted`` without changing it.

    Returns ``{chosen, steps, fidelity_before, budget_bytes, int8_weight_bytes, stopped}``:
    ``chosen`` the module paths in the order picked; ``steps`` per round every candidate's
    ``{layer, gain_db, agreement, extra_bytes}`` (the gain over the previous round's figure).
    """
    pool = candidates(converted, weights, annotated)
    int8_bytes = sum(c.weights for c in pool)
    budget = int(max_growth * int8_bytes)
    chosen: list[Candidate] = []
    base = fidelity_of(converted, batches, expected)
    current, steps, stopped = base, [], "max_layers reached"
    for round_ in range(max_layers + 1):
        if target_sqnr_db is not None and current["sqnr_db"] >= target_sqnr_db:
            stopped = f"target {target_sqnr_db:g} dB reached"
            break
        if round_ == max_layers:
            break
        spent = sum(c.extra_bytes for c in chosen)
        rows = []
        for c in progress([c for c in pool if c not in chosen], f"mixed precision: sensitivity {round_ + 1}"):
            if spent + c.extra_bytes > budget:
                rows.append({"layer": c.layer, "gain_db": None, "agreement": None, "extra_bytes": c.extra_bytes,
                             "skipped": "over the byte budget"})
                continue
            with run_in_float(converted, chosen + [c], weights, annotated) as trial:
                f = fidelity_of(trial, batches, expected)
            rows.append({"layer": c.layer, "gain_db": _gain(f["sqnr_db"], current["sqnr_db"]), "agreement": f["agreement"],
                         "extra_bytes": c.extra_bytes, "sqnr_db": f["sqnr_db"]})
        steps.append(rows)
        measured = [r for r in rows if r["gain_db"] is not None]
        if not measured:
            stopped = "every remaining layer is over the byte budget"
            break
        best = max(measured, key=lambda r: r["gain_db"])
        if best["gain_db"] < min_gain_db:
            stopped = f"no layer gains {min_gain_db:g} dB (best {best['layer']}: {best['gain_db']:.2f} dB)"
            break
        pick = next(c for c in pool if c.layer == best["layer"] and c not in chosen)
        chosen.append(pick)
        current = {"agreement": best["agreement"], "sqnr_db": best["sqnr_db"]}
        log.info("mixed precision: %s kept float (+%.2f dB, %s, %d bytes more)", pick.layer, best["gain_db"],
                 describe_fidelity(current), pick.extra_bytes)
    return {
        "chosen": [c.layer for c in chosen], "chosen_nodes": [c.node for c in chosen if c.kind == "output"],
        "chosen_layers": [c.layer for c in chosen if c.kind == "layer"], "steps": steps, "fidelity_before": base, "fidelity_measured": current,
        "budget_bytes": budget, "int8_weight_bytes": int8_bytes, "extra_bytes": sum(c.extra_bytes for c in chosen),
        "stopped": stopped,
    }


def _gain(after: float, before: float) -> float:
    if math.isinf(after) and math.isinf(before):
        return 0.0
    return after - before


def keep_float(converted: GraphModule, weights: dict[str, torch.Tensor], batches: list, expected: list, requantize,
               *, config, annotated) -> tuple[GraphModule, dict]:
    """Choose (``choose_float_layers``), re-quantize with ``requantize(layers, nodes)`` (module
    paths for ``fp32_layers``, op nodes for ``fp32_nodes``) and keep the result only if its output
    SQNR on ``batches`` rose; returns the model and the report."""
    started = time.perf_counter()
    report = choose_float_layers(converted, weights, batches, expected, max_layers=config.max_layers,
                                 min_gain_db=config.min_gain_db, max_growth=config.max_growth,
                                 target_sqnr_db=config.target_sqnr_db, annotated=annotated)
    result, kept = converted, False
    if report["chosen"]:
        candidate = requantize(tuple(report["chosen_layers"]), tuple(report["chosen_nodes"]))
        after = fidelity_of(candidate, batches, expected)
        report["fidelity_after"] = after
        kept = after["sqnr_db"] > report["fidelity_before"]["sqnr_db"]
        if kept:
            result = candidate
        log.info("mixed precision %s: %s float: %s, int8 everywhere: %s", "kept" if kept else "dropped",
                 ", ".join(report["chosen"]), describe_fidelity(after), describe_fidelity(report["fidelity_before"]))
    report["kept"] = kept
    report["seconds"] = round(time.perf_counter() - started, 3)
    return result, report


def mixed_precision_line(report: dict) -> str:
    """One line for a log: what was chosen, whether it was kept, and the fidelity either way."""
    before, after = report["fidelity_before"], report.get("fidelity_after")
    if not report["chosen"]:
        return f"no layer kept float ({report['stopped']}); int8 everywhere: {describe_fidelity(before)}"
    return (f"{', '.join(report['chosen'])} float ({report['extra_bytes']:,} bytes more), "
            f"{'kept' if report['kept'] else 'dropped'}: {describe_fidelity(after)} against {describe_fidelity(before)} "
            f"int8 everywhere, on the calibration samples")
