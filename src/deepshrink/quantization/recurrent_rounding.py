"""Error-compensating rounding of the int8 weight matrices of LSTM and GRU cells (GPTQ, Frantar et
al. 2022), with activation-aware input scales for the matrix that reads the cell's own input
(AWQ, Lin et al. 2023), on a converted PT2E graph.

``quantizer.annotate_recurrent`` gives every ``w_ih`` / ``w_hh`` one symmetric int8 scale per
output row, and nearest rounding puts each weight on it. A recurrence amplifies what that costs:
on the Resemblyzer speaker encoder (``examples/models/resemblyzer_encoder.py``, a 3-layer LSTM on
power mel frames) the embeddings' cosine to fp32 fell to 0.9955 with the LSTM int8 and nothing
else, and most of that loss is one matrix: the first layer's ``w_ih`` alone took it to 0.9958,
every other matrix alone kept it at 0.9990 or above (eager, 32 held-out partials; measured once by a
script not in the repo). That matrix
reads the input, whose 40 mel bands differ in mean magnitude by three decades; a row's scale is
set by its largest weight, and its error is then multiplied by whatever input the weight sees.

Two remedies, both measured on the recorded inputs of each matrix:

- **GPTQ**: the columns of ``W`` are rounded one at a time (largest input energy first), and each
  rounding error is spread over the columns not yet rounded, through the inverse of the inputs'
  second moment ``H = X^T X``, so the matrix's output error ``tr(dW H dW^T)`` is what is kept small,
  not each weight's own error. The grid (one scale per row) is the observer's, unchanged.
- **Input scales** for the first layer's ``w_ih`` (each direction): ``W x = (W diag(s)) (x / s)``
  with ``s_j = mean|x_j| ^ alpha``; ``W diag(s)`` is quantized per row (new row scales) and a
  ``mul`` by ``1 / s`` is put on the cell's input, once for every time step. ``alpha`` in
  ``ALPHAS`` (0: no scaling) is chosen by that matrix's output error on the calibration inputs.
  Only there: in the ``.pte`` every other matrix is a qd8-f32-qc8w GEMM whose input XNNPACK rounds
  per row at run time (``deploy.recurrent``), which a column scale would have to pass through;
  the first layer's ``w_ih`` is computed in float in both runtimes (``.pte``: dequantized into a
  float constant; ``.onnx``: ONNX Runtime folds the dequantized weights of its LSTM op).

On that encoder (``examples/recipes/speaker-encoder.yaml``, ``bench/results/examples.md``) the int8
model's output SQNR on the calibration samples rises 19.8 -> 28.8 dB, and the embeddings' cosine to
fp32 is 0.9991 through both runtime files.

Each matrix keeps the GPTQ codes only where its output error is below nearest rounding's on
inputs it was not fitted to (two-fold over the calibration samples: ``Moments``); the whole result is kept only if the int8 model's output SQNR against the
float model on the calibration samples did not drop. SQNR alone, as for mixed precision, not the
repairs' agreement-and-SQNR guard (``bias_correction.no_worse``): a recurrent net's output is
often an embedding or a sequence, whose argmax is no answer; on the speaker encoder at 12 frames
(16 calibration samples) re-rounding raised SQNR 24.8 -> 30.8 dB while the embedding's argmax
moved on one sample more (a one-off run, not in the repo).
"""
from __future__ import annotations

import logging
import time

import torch
from torch.fx import GraphModule, Node

from deepshrink.core import samples as S
from deepshrink.core.progress import progress
from deepshrink.quantization.bias_correction import output_fidelity
from deepshrink.quantization.graph_passes import get_attr_tensor, per_row_dequantized, record_nodes, set_attr_tensor
from deepshrink.quantization.quantizer import RECURRENT_TARGETS, int8_weights, is_int8_per_row, recurrent_matrices

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)   # the input-scale exponents tried (AWQ's grid search, coarser)
MIN_INPUT_SCALE = 1e-4                 # s_j's floor, relative to the largest channel's mean magnitude
DAMPING = 0.01                         # added to H's diagonal, times its mean (GPTQ's default)


def int8_cells(gm: GraphModule) -> list[Node]:
    """The ``aten.lstm`` / ``aten.gru`` nodes whose weight matrices are all int8 codes behind a
    per-row ``dequantize_per_channel`` (what ``annotate_recurrent`` leaves after conversion)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in RECURRENT_TARGETS and int8_weights(n)]


def round_recurrent(converted: GraphModule, reference: GraphModule, batches: list, *, expected: list) -> dict:
    """Re-round every int8 recurrent cell of ``converted`` (in place) with GPTQ, its first layer's
    input matrix with input scales; ``reference`` is the float graph (same node names) the float
    weights are read from, ``expected`` its outputs on ``batches``. Returns the record
    ``quantize_report()["recurrent_rounding"]`` holds."""
    started = time.perf_counter()
    cells = int8_cells(converted)
    if not cells:
        return {"applied": False, "cells": 0}
    floats = {n.name: n for n in reference.graph.nodes}
    with torch.no_grad():
        before = output_fidelity(expected, [S.call(converted, x) for x in batches])
    saved = {n.name: (n.args[0], _codes_and_scales(converted, n)) for n in cells}
    matrices = []
    for cell in progress(cells, "recurrent rounding (GPTQ)"):
        matrices += _round_cell(converted, cell, floats[cell.name], reference, batches)
    converted.recompile()
    with torch.no_grad():
        after = output_fidelity(expected, [S.call(converted, x) for x in batches])
    kept = after["sqnr_db"] >= before["sqnr_db"]
    if not kept:
        for cell in cells:
            _restore(converted, cell, *saved[cell.name])
        converted.recompile()
    record = {"applied": True, "kept": kept, "cells": len(cells), "matrices": matrices,
              "fidelity_before": before, "fidelity_after": after, "seconds": round(time.perf_counter() - started, 3)}
    log.info("recurrent rounding: %s", recurrent_rounding_line(record))
    return record


def recurrent_rounding_line(record: dict) -> str:
    """One line for a log of an applied re-rounding: what, whether it was kept, the fidelity either way."""
    scaled = [m for m in record["matrices"] if m["alpha"]]
    inputs = f"; input scales on {', '.join(m['matrix'] for m in scaled)}" if scaled else ""
    before, after = record["fidelity_before"]["sqnr_db"], record["fidelity_after"]["sqnr_db"]
    return (f"GPTQ on {len(record['matrices'])} matrices of {record['cells']} cell(s){inputs}: "
            f"{'kept' if record['kept'] else 'dropped'}, output SQNR {after:.1f} dB against {before:.1f} dB "
            "with nearest rounding, on the calibration samples")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes of ``weight`` ``[rows, cols]`` on the grid ``scales`` (one per row, zero point
    0) that keep ``(codes * scales - weight) @ X^T`` small, for inputs ``X`` with
    ``X^T X = hessian``: GPTQ's column-by-column rounding with error feedback through the upper
    Cholesky factor of ``hessian^-1``, the columns of largest input energy first. A column no
    input reaches (zero diagonal) is rounded to nearest and passes no error on."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scales.double()
    codes = torch.empty_like(w)
    for i in range(w.shape[1]):
        codes[:, i] = torch.clamp(torch.round(w[:, i] / s), qmin, qmax)
        err = (w[:, i] - codes[:, i] * s) / upper[i, i]
        w[:, i + 1:] -= err[:, None] * upper[i, i + 1:][None, :]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out.to(torch.int8)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(approx - weight) X^T||^2`` for inputs with ``X^T X = hessian``."""
    d = (approx.detach() - weight.detach()).double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.detach().double(), d))


class Moments:
    """``X^T X`` of a matrix's recorded inputs (``full``) and of two halves of the samples (even and
    odd, ``folds``; ``None`` with fewer than two samples): codes fitted on one half are scored on
    the other, so a matrix keeps GPTQ's codes only where they beat nearest rounding on inputs they
    were not fitted to. What it cannot see is the drift of the int8 model's own states away from
    the recorded float ones: a 64-wide state seen in 48 rows passed it (held-out error 0.01-0.09 of
    nearest's) while the model's output SQNR fell 43.9 -> 43.5 dB; the whole-model check drops
    that (``test_a_fit_that_hurts_the_output_is_dropped``)."""

    def __init__(self, sequences: list[torch.Tensor]) -> None:
        parts = [0.0, 0.0]
        seen = 0
        for seq in sequences:                      # [T, B, D]
            for b in range(seq.shape[1]):
                x = seq[:, b].double()
                parts[(seen + b) % 2] = parts[(seen + b) % 2] + x.T @ x
            seen += seq.shape[1]
        self.full = parts[0] + parts[1]
        self.folds = (parts[0], parts[1]) if seen >= 2 else None


def _held_out(fit, weight: torch.Tensor, moments: Moments) -> float:
    """Output error of ``fit(hessian) -> approx`` fitted on each half of the samples and scored on
    the other, summed (two-fold cross-validation); on all samples when there are no halves."""
    if moments.folds is None:
        return output_error(weight, fit(moments.full), moments.full)
    a, b = moments.folds
    return output_error(weight, fit(a), b) + output_error(weight, fit(b), a)


def _round_cell(gm: GraphModule, cell: Node, float_cell: Node, reference: GraphModule, batches: list) -> list[dict]:
    """GPTQ for each matrix of one cell, layer by layer: each layer's inputs are the outputs of the
    layers below it as already re-rounded."""
    lstm = cell.target == torch.ops.aten.lstm.input
    has_biases, num_layers, bidirectional, batch_first = cell.args[3], cell.args[4], cell.args[7], cell.args[8]
    per, directions = (4 if has_biases else 2), (2 if bidirectional else 1)
    params, float_params = list(cell.args[2]), list(float_cell.args[2])
    inputs, states = _recorded_inputs(gm, cell, batches, lstm)
    rows = [_time_major(x, batch_first) for x in inputs]              # [T, B, in] per batch
    report: list[dict] = []

    def float_weight(layer: int, direction: int, which: int) -> torch.Tensor:
        return get_attr_tensor(reference, float_params[(layer * directions + direction) * per + which]).detach()

    for layer in range(num_layers):
        layer_params = [params[k * per:(k + 1) * per] for k in range(layer * directions, (layer + 1) * directions)]
        # w_ih: every direction of the layer reads the same input rows
        moments = Moments(rows)
        quantized_rows = rows   # what the re-rounded layer reads: the input divided by its scales, if any
        if layer == 0:
            mean_abs = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double().abs().mean(0)
            factor = _input_scales(gm, [p[0] for p in layer_params], [float_weight(0, d, 0) for d in range(directions)],
                                   moments, mean_abs, report, [_name(cell, 0, "ih", d) for d in range(directions)])
            if factor is not None:
                quantized_rows = [r / factor.to(r.dtype) for r in rows]
                _scale_input(gm, cell, factor)
        else:
            for direction, p in enumerate(layer_params):
                report.append(_round_matrix(gm, p[0], float_weight(layer, direction, 0), moments,
                                            _name(cell, layer, "ih", direction)))
        # w_hh: the state each step reads, from the layer run in float on its input
        previous = [_run_layer(cell, float_params, reference, layer, r, state, lstm)[1] for r, state in zip(rows, states)]
        for direction, p in enumerate(layer_params):
            report.append(_round_matrix(gm, p[1], float_weight(layer, direction, 1), Moments([prev[direction] for prev in previous]),
                                        _name(cell, layer, "hh", direction)))
        # the next layer's input: this layer with its re-rounded weights
        rows = [_run_layer(cell, params, gm, layer, r, state, lstm, dequantize=True)[0]
                for r, state in zip(quantized_rows, states)]
    return report


def _input_scales(gm, dqs: list[Node], weights: list[torch.Tensor], moments: Moments, mean_abs, report: list,
                  names: list[str]) -> torch.Tensor | None:
    """Choose ``alpha`` for the first layer's ``w_ih`` (all directions at once: they share the
    input) by held-out output error, write its codes and row scales, and return the input factor
    ``s`` (``None``: no input scaling, alpha 0 won or nearest rounding stays)."""
    qmin, qmax = dqs[0].args[4], dqs[0].args[5]
    best = None
    for alpha in ALPHAS:
        # a floor: an input channel near zero on calibration must not get an unbounded factor
        s = mean_abs.clamp_min(float(mean_abs.max()) * MIN_INPUT_SCALE) ** alpha
        s = s / s.max()

        def fit(hessian, w, s=s):
            scaled = w.double() * s[None, :]
            scales = (scaled.abs().amax(1) / qmax).clamp_min(2 ** -30)
            codes = gptq(scaled, hessian / (s[:, None] * s[None, :]), scales, qmin, qmax)
            return codes, scales

        errors = [_held_out(lambda h, w=w, fit=fit, s=s: _unscaled(*fit(h, w), s), w, moments) for w in weights]
        if best is None or sum(errors) < sum(best[1]):
            best = (alpha, errors, fit, s)
    alpha, errors, fit, s = best
    nearest = [output_error(w, per_row_dequantized(gm, dq), moments.full) for w, dq in zip(weights, dqs)]
    if sum(errors) >= sum(nearest):   # the observer's grid and nearest rounding stay
        report += [{"matrix": n, "alpha": 0.0, "error_ratio": round(e / b, 4) if b else 1.0, "gptq": False}
                   for n, e, b in zip(names, errors, nearest)]
        return None
    for w, dq in zip(weights, dqs):
        codes, scales = fit(moments.full, w)
        set_attr_tensor(gm, dq.args[0], codes)
        set_attr_tensor(gm, dq.args[1], scales.to(get_attr_tensor(gm, dq.args[1]).dtype))
    report += [{"matrix": n, "alpha": alpha, "error_ratio": round(e / b, 4) if b else 0.0, "gptq": True}
               for n, e, b in zip(names, errors, nearest)]
    return s if alpha else None


def _unscaled(codes: torch.Tensor, scales: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return codes.double() * scales[:, None] / s[None, :]


def _round_matrix(gm, dq: Node, weight: torch.Tensor, moments: Moments, name: str) -> dict:
    """GPTQ codes for one matrix on its observer's grid, written only where they beat nearest
    rounding on held-out inputs. ``error_ratio``: held-out output error against nearest's."""
    scales = get_attr_tensor(gm, dq.args[1]).double()
    qmin, qmax = dq.args[4], dq.args[5]
    nearest = output_error(weight, per_row_dequantized(gm, dq), moments.full)
    held = _held_out(lambda h: gptq(weight, h, scales, qmin, qmax).double() * scales[:, None], weight, moments)
    better = held < nearest
    if better:
        set_attr_tensor(gm, dq.args[0], gptq(weight, moments.full, scales, qmin, qmax))
    return {"matrix": name, "alpha": 0.0, "error_ratio": round(held / nearest, 4) if nearest else 1.0, "gptq": better}


def _run_layer(cell: Node, params: list, owner: GraphModule, layer: int, rows: torch.Tensor, state, lstm: bool,
               *, dequantize: bool = False):
    """One layer of ``cell`` on time-major ``rows`` ``[T, B, in]``: its output ``[T, B, D * H]`` and,
    per direction, the state each step read ``[T, B, H]`` (the initial state, then the outputs
    shifted by one step in that direction's order)."""
    has_biases, bidirectional = cell.args[3], cell.args[7]
    per, directions = (4 if has_biases else 2), (2 if bidirectional else 1)
    chosen = []
    for direction in range(directions):
        k = layer * directions + direction
        for p in params[k * per:(k + 1) * per]:
            chosen.append(per_row_dequantized(owner, p).float() if dequantize and is_int8_per_row(p) else get_attr_tensor(owner, p))
    h0 = state[0] if lstm else state
    h = h0[layer * directions:(layer + 1) * directions]
    with torch.no_grad():
        if lstm:
            c = state[1][layer * directions:(layer + 1) * directions]
            out = torch.ops.aten.lstm.input(rows, [h, c], chosen, has_biases, 1, 0.0, False, bidirectional, False)[0]
        else:
            out = torch.ops.aten.gru.input(rows, h, chosen, has_biases, 1, 0.0, False, bidirectional, False)[0]
    hidden = h.shape[-1]
    previous = []
    for direction in range(directions):
        seq = out[..., direction * hidden:(direction + 1) * hidden]
        first = h[direction][None]
        previous.append(torch.cat([first, seq[:-1]]) if direction == 0 else torch.cat([seq[1:], first]))
    return out, previous


def _recorded_inputs(gm: GraphModule, cell: Node, batches: list, lstm: bool):
    """The cell's input and initial state on each calibration batch, from the graph as it is now."""
    x, hx = cell.args[0], cell.args[1]
    state = list(hx) if lstm else [hx]
    names = {x.name, *(s.name for s in state)}
    inputs, states = [], []
    for batch in batches:
        values = record_nodes(gm, batch, names)
        inputs.append(values[x.name])
        got = [values[s.name] for s in state]
        states.append(got if lstm else got[0])
    return inputs, states


def _scale_input(gm: GraphModule, cell: Node, factor: torch.Tensor) -> None:
    """``cell``'s input divided by ``factor`` (one ``mul`` by its inverse, every time step at once)."""
    name = f"_deepshrink_input_scale_{cell.name}"
    gm.register_buffer(name, (1.0 / factor).float())
    with gm.graph.inserting_before(cell):
        attr = gm.graph.get_attr(name)
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (cell.args[0], attr))
    cell.args = (scaled, *cell.args[1:])


def _restore(gm: GraphModule, cell: Node, x: Node, saved: list) -> None:
    scaled = cell.args[0]
    for dq, (codes, scales) in zip(recurrent_matrices(cell), saved):
        set_attr_tensor(gm, dq.args[0], codes)
        set_attr_tensor(gm, dq.args[1], scales)
    if scaled is not x:
        cell.args = (x, *cell.args[1:])
        attr = scaled.args[1]
        gm.graph.erase_node(scaled)
        gm.graph.erase_node(attr)
        delattr(gm, attr.target)


def _codes_and_scales(gm: GraphModule, cell: Node) -> list:
    return [(get_attr_tensor(gm, dq.args[0]).clone(), get_attr_tensor(gm, dq.args[1]).clone()) for dq in recurrent_matrices(cell)]


def _time_major(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x.transpose(0, 1) if batch_first else x


def _name(cell: Node, layer: int, kind: str, direction: int) -> str:
    return f"{cell.name}.weight_{kind}_l{layer}{'_reverse' if direction else ''}"
