"""Issue 3 benchmarks: unstructured pruning of LeNet-300-100 on MNIST.

    .venv/bin/python bench/pruning.py            # ~10 min on one core; writes bench/results/pruning.md

1. Headline: iterative global magnitude pruning with distillation to <= 5 % of weights at test
   error <= 1.64 % (Han et al. 2015: 8 % kept, 1.59 %). Artifact bench/artifacts/lenet-300-100-pruned.dsk.
2. Criteria (magnitude, gradient, Taylor, random) x schedules (one-shot, iterative, gradual) at
   90/95/98 % sparsity, each with the same 5-epoch budget after the dense baseline.
3. Latency at batch 1 of the pruned model: dense kernels vs CSR sparse kernels vs the .pte, one interleaved run.
"""
from __future__ import annotations

import copy
import time

import torch

from baselines import dense_baseline, mnist
from common import REPO, provenance

import deepshrink as ds
from deepshrink.pruning import GradientPruning, MagnitudePruning, RandomPruning, ScheduledPruning, TaylorPruning
from deepshrink.pruning.schedules import Gradual, Iterative, OneShot
from deepshrink.training import Distillation, TrainConfig, accuracy

ARTIFACT = REPO / "bench" / "artifacts" / "lenet-300-100-pruned.dsk"
CRITERIA = {"magnitude": MagnitudePruning, "gradient": GradientPruning, "taylor": TaylorPruning, "random": RandomPruning}


def weight_counts(model) -> tuple[int, int]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    return sum(int((w != 0).sum()) for w in weights), sum(w.numel() for w in weights)


def test_error(model, data) -> float:
    return 100 * (1 - accuracy(model, data.loader("test", batch_size=1000)))


def schedules_for(sparsity: float, budget: int) -> dict:
    return {
        "one-shot": OneShot(),
        "iterative": Iterative(sparsities=tuple(round(sparsity * f, 4) for f in (0.6, 0.85)), epochs_per_step=1),
        "gradual": Gradual(initial=0.0, start=0, steps=3, interval=1),
    }


def headline(dense, data) -> tuple[torch.nn.Module, list[str]]:
    model = copy.deepcopy(dense)
    config = MagnitudePruning(sparsity=0.95, scope="global", skip_classifier=False)
    schedule = Gradual(initial=0.0, start=0, steps=10, interval=2)
    train = TrainConfig(epochs=40, lr=5e-4, batch_size=64, distill=Distillation(temperature=2.0, alpha=0.7), seed=0)
    started = time.perf_counter()
    steps = ds.prune_report(ds.prune(model, ScheduledPruning(config, schedule, train), data=data, teacher=dense)).steps
    ds.finalize(model)
    kept, total = weight_counts(model)
    lines = [f"| {s.epoch} | {100 * s.sparsity:.1f} | {100 * max(s.history.val_accuracy or [0]):.2f} |" for s in steps]
    print(f"headline: {kept}/{total} weights kept, error {test_error(model, data):.2f} % in {time.perf_counter() - started:.0f} s")
    return model, lines


def grid(dense, data, budget: int = 5) -> list[str]:
    rows = []
    for sparsity in (0.90, 0.95, 0.98):
        for cname, klass in CRITERIA.items():
            cells = []
            for sname, schedule in schedules_for(sparsity, budget).items():
                model = copy.deepcopy(dense)
                config = klass(sparsity=sparsity, scope="global", skip_classifier=False)
                ds.prune(model, ScheduledPruning(config, schedule, TrainConfig(epochs=budget, lr=1e-3, batch_size=128, seed=0)),
                         data=data)
                ds.finalize(model)
                kept, total = weight_counts(model)
                assert abs(kept - round((1 - sparsity) * total)) <= 1, (kept, total)
                cells.append(f"{test_error(model, data):.2f}")
            rows.append(f"| {100 * sparsity:.0f} % | {cname} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    data = mnist()
    dense, dense_err = dense_baseline("lenet-300-100", data)
    model, steps = headline(dense, data)
    kept, total = weight_counts(model)
    err = test_error(model, data)
    example = data.example_input(64)
    ds.export(model, ARTIFACT, example_input=example)
    out = REPO / "bench" / ".cache" / "pruning"
    ds.export(dense, out / "dense.pte", example_input=example)
    ds.export(model, out / "pruned.pte", example_input=example)
    from deepshrink.evaluation.compare import evaluate_many

    measured = evaluate_many({
        "dense fp32, eager": dense, "pruned, eager dense kernels": model,
        "pruned .dsk (CSR where measured faster)": ARTIFACT, "dense fp32 .pte": out / "dense.pte", "pruned .pte (XNNPACK dense)": out / "pruned.pte",
    }, data.test, threads=1, latency_runs=1000, warmup=100)
    from deepshrink.formats.sidecar import read_sidecar

    decisions = read_sidecar(ARTIFACT)["sparse_compute"]
    grid_rows = grid(dense, data)
    latency_rows = [
        f"| {label} | {m.runtime} | {100 * (1 - m.accuracy):.2f} | {m.file_bytes or '—'} | {m.latency_ms_median * 1e3:.1f} | {m.latency_ms_p90 * 1e3:.1f} |"
        for label, m in measured.items()
    ]
    decision_rows = [f"| {d['layer']} | {100 * d['sparsity']:.1f} | {d['dense_us']:.1f} | {d['sparse_us']:.1f} | {'sparse' if d['runs_sparse'] else 'dense'} |"
                     for d in decisions]
    text = f"""# Unstructured pruning: LeNet-300-100 on MNIST

{provenance("python bench/pruning.py", threads=1)}
- data: MNIST, 55,000 train / 5,000 validation (seeded split of the official train set) / the official 10,000 test images
- one run per cell (seed 0); no spread measured

## Headline: {100 * kept / total:.2f} % of weights left at {err:.2f} % test error

Dense baseline (Adam, 30 epochs, cached in bench/.cache): **{dense_err:.2f} %** test error, {total:,} weights.
Pruned: global magnitude over all three layers (classifier included), gradual (Zhu & Gupta cubic ramp,
10 prunes two epochs apart, then 20 epochs), 40 epochs in all, Adam lr 5e-4 restarting each round, batch 64,
distilling from the dense model (T = 2, alpha = 0.7): **{kept:,} of {total:,} weights kept ({100 * kept / total:.2f} %, {total / kept:.1f}x fewer)**,
test error **{err:.2f} %** (target: <= 5 % kept at <= 1.64 %; Han et al. 2015: 8 %, 1.59 %).

Artifact: `bench/artifacts/lenet-300-100-pruned.dsk` ({ARTIFACT.stat().st_size:,} bytes; dense fp32 would be {4 * 266_610:,}).
Reproduce: `deepshrink evaluate bench/artifacts/lenet-300-100-pruned.dsk --data mnist --data-dir ../shared/data/mnist`.

| round starts at epoch | sparsity % | best val accuracy % |
|---:|---:|---:|
{chr(10).join(steps)}

## Criteria x schedules (test error %, 5 epochs after the dense baseline)

Same budget for every cell: one-shot prunes at epoch 0 and fine-tunes 5 epochs; iterative prunes at
0.6 s, 0.85 s and s (one epoch between); gradual follows the Zhu & Gupta cubic ramp in 3 steps one epoch
apart. Global scope over all layers; Adam lr 1e-3 restarting each round; no distillation.
Gradient and Taylor scores are accumulated over 8 batches of 64.

| sparsity | criterion | one-shot | iterative | gradual |
|---|---|---:|---:|---:|
{chr(10).join(grid_rows)}

## Latency at batch 1, one thread, measured interleaved in one run (1,000 calls each after 100 warm-up)

Absolute numbers from this CPU do not transfer to phones; the ratios are the point (what its features mean is in the header).

| variant | runtime | test error % | file bytes | median µs | p90 µs |
|---|---|---:|---:|---:|---:|
{chr(10).join(latency_rows)}

Per-layer decision made at export by timing dense against CSR on the layer's real input (stored in the
sidecar, applied when the .dsk is loaded):

| layer | sparsity % | dense µs | CSR µs | runs |
|---|---:|---:|---:|---|
{chr(10).join(decision_rows)}

The two .pte files are the same size: XNNPACK stores these layers dense and its dense kernels multiply
the zeros too (its sparse kernels cover 1x1 convolutions only), so any latency gap between them is not
skipped work. The .dsk is what stores the sparsity ({ARTIFACT.stat().st_size:,} bytes); whether CSR kernels
also run faster was measured per layer above, and at this layer size and batch 1 they did not pay.
"""
    (REPO / "bench" / "results" / "pruning.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
