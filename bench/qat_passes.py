"""The fixed cost of QAT's graph passes: torchao's as they are against deepshrink's narrowing of them.

    .venv/bin/python bench/qat_passes.py     # ~6 min on one thread; writes bench/results/qat_passes.md

torchao 0.18 rewrites a QAT graph by pattern: ``prepare_qat_pt2e`` fuses conv-bn, ``convert_pt2e``
folds it, and each ``move_exported_model_to_train/eval`` switches dropout and batch norm, every
time tracing its patterns (small ``torch.export`` calls) for every conv kind and op, whether the
graph holds them or not. ``deepshrink.quantization.qat`` runs the same rewrites only for the conv
kinds and ops the graph holds. For each net below, each pass is timed both ways, alternating,
``REPEATS`` times after one warm-up of each (the first call of a process pays imports), and the two
results are compared node for node and output for output.

Nets: the zoo ``mobile-cnn`` (Conv2d, depthwise, batch norm; no dropout) and a speech front end
(Conv1d-BatchNorm1d-ReLU, pooled, Linear, dropout). Random weights and inputs, seed 0: the passes'
cost does not depend on training.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from common import REPO, provenance

from deepshrink.core.graph import capture
from deepshrink.models import create
from deepshrink.quantization.qat import _conv_bn_rewrites_for_kinds_present, _switch_mode
from deepshrink.quantization.quantizer import build_quantizer, quantization_config

THREADS = 1
REPEATS = 3
OUT = REPO / "bench" / "results" / "qat_passes.md"


def speech_front_end() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(40, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                         nn.Conv1d(32, 32, 3, padding=1, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 8))


NETS = {
    "zoo mobile-cnn": (lambda: create("mobile-cnn"), (8, 1, 28, 28)),
    "speech front end (Conv1d-BN1d, dropout)": (speech_front_end, (8, 40, 50)),
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def same(a: torch.fx.GraphModule, b: torch.fx.GraphModule, x: torch.Tensor) -> bool:
    if [str(n.target) for n in a.graph.nodes] != [str(n.target) for n in b.graph.nodes]:
        return False
    torch.manual_seed(0)
    out_a = a(x)
    torch.manual_seed(0)
    return torch.equal(out_a, b(x))


def measure(name: str) -> list[tuple]:
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    make, shape = NETS[name]
    model = make().train()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    quantizer = lambda: build_quantizer(quantization_config(per_channel=True, qat=True, int8_layout="s8s8-reduced"))
    graph = lambda: capture(copy.deepcopy(model), x, max_batch=shape[0], dynamic=None, training=True).module()

    def prepare(narrow: bool):
        g = graph()
        if not narrow:
            return timed(lambda: prepare_qat_pt2e(g, quantizer()))
        with _conv_bn_rewrites_for_kinds_present(g):
            return timed(lambda: prepare_qat_pt2e(g, quantizer()))

    def convert(prepared, narrow: bool):
        p = copy.deepcopy(prepared)
        if not narrow:
            return timed(lambda: convert_pt2e(p))
        with _conv_bn_rewrites_for_kinds_present(p):
            return timed(lambda: convert_pt2e(p))

    def switch(prepared, narrow: bool):
        """One eval -> train round trip: the two switches ``fit`` makes around each validation."""
        p = copy.deepcopy(prepared)
        if narrow:
            return timed(lambda: (_switch_mode(p, False), _switch_mode(p, True)))
        return timed(lambda: (move_exported_model_to_eval(p), move_exported_model_to_train(p)))

    times = {(step, narrow): [] for step in ("prepare", "convert", "switch") for narrow in (False, True)}
    results = {}
    for repeat in range(REPEATS + 1):   # round 0 warms both ways up and is not counted
        for narrow in (False, True):
            t, prepared = prepare(narrow)
            t_conv, converted = convert(prepared, narrow)
            t_switch, _ = switch(prepared, narrow)
            if repeat:
                times[("prepare", narrow)].append(t)
                times[("convert", narrow)].append(t_conv)
                times[("switch", narrow)].append(t_switch)
            results[narrow] = (prepared, converted)
    # converted first: the prepared graphs' first call (training mode, observers on) moves their observers
    checks = {"convert": same(results[False][1], results[True][1], x),
              "prepare": same(results[False][0], results[True][0], x)}
    rows = []
    for step, what in (("prepare", "prepare_qat_pt2e (conv-bn fuse)"), ("convert", "convert_pt2e (conv-bn fold)"),
                       ("switch", "eval + train switch (dropout, batch norm)")):
        full, narrow = (statistics.median(times[(step, n)]) for n in (False, True))
        verdict = {True: "same nodes, same outputs", False: "DIFFERENT", None: "—"}[checks.get(step)]
        rows.append((name, what, full, narrow, full / narrow, verdict))
    return rows


def main() -> None:
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    rows = [row for name in NETS for row in measure(name)]
    lines = [
        "# QAT graph passes: torchao as it is against the narrowing in deepshrink.quantization.qat",
        "",
        provenance("python bench/qat_passes.py", threads=THREADS),
        f"- method: each pass timed both ways, alternating, {REPEATS} times after one uncounted warm-up round; "
        "median seconds; random weights and inputs, seed 0",
        f"- total wall time {(time.perf_counter() - started) / 60:.1f} min",
        "",
        "| net | pass | torchao s | deepshrink s | × faster | results |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += [f"| {n} | {w} | {f:.2f} | {d:.2f} | {r:.1f} | {c} |" for n, w, f, d, r, c in rows]
    lines += ["", "The switch row is one eval -> train round trip, which `deepshrink.training.fit` makes around each "
              "epoch's validation; its results are the same graph by construction (the same torchao rewrites, skipped "
              "only where the graph holds no node they match)."]
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
