"""Low-bit weight quantization on MNIST: QAT and mixed precision on LeNet-5, codebooks on LeNet-300-100.

    .venv/bin/python bench/quant_lowbit.py [--part all|lenet-5|lenet-300-100|grid] [--data-dir DIR]

Writes bench/results/quant_lowbit.md and bench/artifacts/lenet-5-w4-qat.dsk (only when every part
runs; one part prints its table instead, and ``--part grid`` writes bench/results/quant_lowbit_grid.md). Part ``grid``: float vs int8-grid k-means codebooks on
LeNet-300-100, each also made an int8 ``.pte`` (Int8DynamicLowBit 8-bit per channel) from the model
loaded back from its ``.dsk``, with that file's own test accuracy. Dense models are
trained once and cached in bench/.cache/quant_lowbit/ (delete it to retrain). Every accuracy is on the full
10,000-image MNIST test split, measured on the model loaded back from its .dsk file (weights
decoded, eager PyTorch, 1 thread); each load is also checked to give bit-identical logits to the
in-memory model. One run, fixed seeds.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, SHARED_DATA, provenance

from deepshrink.data import load as load_data
from deepshrink.models.loading import load_checkpoint, save_checkpoint
from deepshrink.models.zoo import create
from deepshrink.api import quantize   # deepshrink.training.fit trains the schemes that train
from deepshrink.deploy import export
from deepshrink.evaluation.runners import open_runner
from deepshrink.quantization.lowbit import (Codebook, Int8DynamicLowBit, WeightOnly, WeightQAT, bit_sensitivity,
                                            load_compressed, measure_front, quantized_weights, save_compressed)
from deepshrink.training import TrainConfig, accuracy, fit

CACHE = REPO / "bench" / ".cache" / "quant_lowbit"  # own subfolder: other benches cache models here too
ARTIFACT = REPO / "bench" / "artifacts" / "lenet-5-w4-qat.dsk"
RESULT = REPO / "bench" / "results" / "quant_lowbit.md"
GRID_RESULT = REPO / "bench" / "results" / "quant_lowbit_grid.md"
COMMAND = ".venv/bin/python bench/quant_lowbit.py"
THREADS = 1
DENSE_TRAIN = {"lenet-5": TrainConfig(epochs=4, lr=1e-3, batch_size=64, seed=0),
               "lenet-300-100": TrainConfig(epochs=10, lr=1e-3, batch_size=64, seed=0)}
QAT_EPOCHS = 2
# the chooser's objective: "kl" (the default, decided before this run) and "loss" beside it
OBJECTIVES = ("kl", "loss")
FINETUNE_EPOCHS = 2
GRID_BITS = (4, 5)
PARTS = ("all", "lenet-5", "lenet-300-100", "grid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, default="all",
                        help="run one part and print its table (quant_lowbit.md is written only by 'all', quant_lowbit_grid.md by 'grid')")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA / "mnist", help="MNIST folder")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    data = load_data("mnist", data_dir=args.data_dir)
    scratch = Path(tempfile.mkdtemp(prefix="quant_lowbit-"))
    timings: dict[str, float | None] = {}
    if args.part == "grid":   # its own results file: the grid rows need no LeNet-5 QAT run
        section = grid_section(bench_grid(data, scratch, timings))
        text = (f"# Codebooks on the int8 grid: the .dsk and the int8 .pte hold the same numbers\n\n"
                f"{provenance('python bench/quant_lowbit.py --part grid', threads=THREADS)}\n"
                f"- wall time {time.perf_counter() - start:.0f} s; one run, seed 0\n\n{section}\n")
        GRID_RESULT.write_text(text)
        print(text)
        return
    if args.part != "all":
        result = bench_lenet5(data, scratch, timings) if args.part == "lenet-5" else bench_lenet300(data, scratch, timings)
        print(json.dumps({"rows": result["rows"], "timings": timings}, indent=1, default=str))
        return
    lenet5 = bench_lenet5(data, scratch, timings)
    mlp = bench_lenet300(data, scratch, timings)
    grid = bench_grid(data, scratch, timings)
    timings["total"] = time.perf_counter() - start
    RESULT.write_text(report(lenet5, mlp, grid, timings, n_test=len(data.test)))
    print(RESULT.read_text())


# ---------------------------------------------------------------- shared helpers


def dense_model(name: str, data, timings: dict) -> torch.nn.Module:
    path = CACHE / f"{name}-dense.safetensors"
    if path.is_file():
        timings[f"{name} dense training"] = None  # cached by an earlier run
        return load_checkpoint(path).eval()
    t = time.perf_counter()
    torch.manual_seed(0)
    model = create(name)
    fit(model, data, DENSE_TRAIN[name], progress=False)
    save_checkpoint(model, path)
    timings[f"{name} dense training"] = time.perf_counter() - t
    return model.eval()


def shipped(model: torch.nn.Module, path: Path, data, params: int) -> dict:
    """Save, load back, check identical logits, and measure the loaded model on the test split."""
    save_compressed(model, path)
    loaded = load_compressed(path)
    x = torch.stack([data.test[i][0] for i in range(1000)])
    with torch.no_grad():
        identical = torch.equal(model.eval()(x), loaded(x))
    if not identical:
        raise SystemExit(f"{path.name}: the model loaded from the .dsk differs from the one saved")
    payload = path.read_bytes()
    acc = accuracy(loaded, data.loader("test", batch_size=1000))
    return {"accuracy": acc, "dsk_bytes": len(payload), "gzip_bytes": len(gzip.compress(payload, 9)),
            "ratio": 4 * params / len(payload)}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    clone = create(model._deepshrink_arch["zoo"], **model._deepshrink_arch["kwargs"])
    clone.load_state_dict(model.state_dict())
    return clone.eval()


# ---------------------------------------------------------------- (a) LeNet-5


def bench_lenet5(data, scratch: Path, timings: dict) -> dict:
    dense = dense_model("lenet-5", data, timings)
    params = n_params(dense)
    rows = [{"label": "dense fp32", **shipped(dense, scratch / "l5-dense.dsk", data, params)}]
    t = time.perf_counter()
    for bits in (8, 6, 4, 3, 2):
        model = quantize(copy_of(dense), WeightOnly(bits=bits), data=data)
        rows.append({"label": f"PTQ {bits}-bit per-channel", **shipped(model, scratch / f"l5-ptq{bits}.dsk", data, params)})
    timings["lenet-5 PTQ rows"] = time.perf_counter() - t
    qat = {}
    for method in ("lsq", "ste"):
        t = time.perf_counter()
        model = quantize(copy_of(dense), WeightQAT(bits=4, method=method, train=TrainConfig(epochs=QAT_EPOCHS, lr=1e-4)), data=data)
        path = ARTIFACT if method == "lsq" else scratch / "l5-w4-ste.dsk"
        path.parent.mkdir(parents=True, exist_ok=True)
        qat[method] = {"label": f"QAT 4-bit per-channel, {method.upper()}, {QAT_EPOCHS} epochs",
                       **shipped(model, path, data, params)}
        rows.append(qat[method])
        timings[f"lenet-5 QAT {method}"] = time.perf_counter() - t
    t = time.perf_counter()
    sensitivity = bit_sensitivity(dense, data, (2, 3, 4, 5, 6, 8), config=WeightOnly())
    timings["lenet-5 sensitivity (24 val passes)"] = time.perf_counter() - t
    total = sum(sensitivity.sizes.values())
    budgets = [int(b * total) for b in (2.5, 3.0, 3.5, 4.0, 5.0)]
    t = time.perf_counter()
    front = measure_front(dense, data, sensitivity, budgets_bits=budgets, uniform=(8, 6, 4, 3),
                          split="test", objectives=OBJECTIVES, save_dir=scratch / "front")
    timings[f"lenet-5 mixed-precision front ({len(front['measured'])} points)"] = time.perf_counter() - t
    return {"params": params, "rows": rows, "qat": qat, "dense": rows[0], "front": front, "budgets": budgets}


# ---------------------------------------------------------------- (b) LeNet-300-100


def bench_lenet300(data, scratch: Path, timings: dict) -> dict:
    dense = dense_model("lenet-300-100", data, timings)
    params = n_params(dense)
    rows = [{"scheme": "dense fp32", "bits": 32, "finetune": "—", **shipped(dense, scratch / "mlp-dense.dsk", data, params)}]
    t = time.perf_counter()
    for bits in (2, 3, 4):
        variants = [
            ("uniform per-tensor", "—", WeightOnly(bits=bits, granularity="per_tensor")),
            ("uniform per-channel", "—", WeightOnly(bits=bits)),
            ("uniform per-channel", f"QAT-STE {FINETUNE_EPOCHS} ep", WeightQAT(bits=bits, method="ste", train=TrainConfig(epochs=FINETUNE_EPOCHS, lr=1e-4))),
            ("k-means", "—", Codebook(method="kmeans", bits=bits)),
            ("k-means", f"centroids {FINETUNE_EPOCHS} ep", Codebook(method="kmeans", bits=bits, train=TrainConfig(epochs=FINETUNE_EPOCHS, lr=1e-4))),
            ("equal-population", "—", Codebook(method="equal_population", bits=bits)),
            ("equal-population", f"centroids {FINETUNE_EPOCHS} ep",
             Codebook(method="equal_population", bits=bits, train=TrainConfig(epochs=FINETUNE_EPOCHS, lr=1e-4))),
            ("power-of-two", "—", Codebook(method="power_of_two", bits=bits)),
        ]
        for scheme, finetune, config in variants:
            model = quantize(copy_of(dense), config, data=data)
            path = scratch / f"mlp-{scheme}-{bits}-{finetune}.dsk".replace(" ", "_")
            rows.append({"scheme": scheme, "bits": bits, "finetune": finetune, **shipped(model, path, data, params)})
    timings["lenet-300-100 scheme rows (24)"] = time.perf_counter() - t
    return {"params": params, "rows": rows, "dense": rows[0]}


# ---------------------------------------------------------------- (c) int8-grid codebooks, LeNet-300-100


def bench_grid(data, scratch: Path, timings: dict) -> dict:
    """Float vs int8-grid k-means codebooks: the .dsk, and the int8 .pte made from the model loaded
    back from it (Int8DynamicLowBit 8-bit per channel), each measured on the full test split."""
    dense = dense_model("lenet-300-100", data, timings)
    params = n_params(dense)
    example = torch.stack([data.test[i][0] for i in range(64)])
    t = time.perf_counter()
    rows = []
    for bits in GRID_BITS:
        for finetune, train in (("—", None), (f"centroids {FINETUNE_EPOCHS} ep",
                                               TrainConfig(epochs=FINETUNE_EPOCHS, lr=1e-4))):
            for grid in ("float", "int8"):
                model = quantize(copy_of(dense), Codebook(method="kmeans", bits=bits, grid=grid, train=train), data=data)
                path = scratch / f"grid-{grid}-{bits}-{'ft' if train else 'ptq'}.dsk"
                row = {"grid": grid, "bits": bits, "finetune": finetune, **shipped(model, path, data, params)}
                loaded = load_compressed(path)
                weights = {n: p.detach().clone() for n, p in loaded.named_parameters() if n in quantized_weights(loaded)}
                runtime = quantize(copy.deepcopy(loaded), Int8DynamicLowBit(bits=8, group_size=None), data=None)
                row["max_weight_diff"] = max(
                    float((runtime.get_submodule(n.rsplit(".", 1)[0]).dequantized_weight() - w).abs().max())
                    for n, w in weights.items())
                result = export(runtime, path.with_suffix(".pte"), example_input=example)
                row["pte_bytes"], row["pte_parity"] = result.file_bytes, result.parity_passed
                row["pte_accuracy"] = runtime_accuracy(result.path, data)
                rows.append(row)
    timings[f"lenet-300-100 int8-grid codebook rows ({len(rows)}, .dsk + .pte)"] = time.perf_counter() - t
    return {"params": params, "rows": rows}


def runtime_accuracy(path: Path, data) -> float:
    runner = open_runner(path, threads=THREADS)
    correct = total = 0
    for x, y in data.loader("test", batch_size=1000):
        correct += int((runner.predict(x).argmax(1) == y).sum())
        total += int(y.numel())
    return correct / total


def grid_section(grid: dict) -> str:
    def row(r):
        same = "yes (0)" if r["max_weight_diff"] == 0 else f"no ({r['max_weight_diff']:.2g})"
        return (f"| {r['grid']} | {r['bits']} | {r['finetune']} | {100 * r['accuracy']:.2f} | {r['dsk_bytes']:,} | "
                f"{100 * r['pte_accuracy']:.2f} | {r['pte_bytes']:,} | {same} | {'PASS' if r['pte_parity'] else 'FAIL'} |")

    return f"""## (c) LeNet-300-100 ({grid['params']:,} parameters): float vs int8-grid k-means codebooks

`Codebook(method="kmeans", bits, grid)`, all three layers, fine-tuning as in (b). `grid="int8"` snaps
each layer's levels onto each output channel's symmetric int8 grid (scale = max|w_c| / 127 of the
weight before quantizing); the `.dsk` stores the float levels and indices as for `grid="float"`, plus
one float32 scale per channel. The `.pte` is `Int8DynamicLowBit(bits=8, group_size=None)` (XNNPACK
qd8-f32-qc8w: int8 weights per channel, int8 activations per row at run time) of the model *loaded
back from the .dsk*; "same weights" compares that module's dequantized int8 weights with the .dsk's
(max |Δ| in brackets). Accuracies on the full test split: `.dsk` in eager PyTorch, `.pte` in ExecuTorch.

| grid | bits | fine-tuning | .dsk test acc % | .dsk bytes | .pte test acc % | .pte bytes | .pte weights = .dsk weights | .pte parity |
|---|---:|---|---:|---:|---:|---:|---|---|
{chr(10).join(row(r) for r in grid['rows'])}
"""


# ---------------------------------------------------------------- report


def report(l5: dict, mlp: dict, grid: dict, timings: dict, *, n_test: int) -> str:
    dense_acc = l5["dense"]["accuracy"]
    lsq = l5["qat"]["lsq"]
    qat_drop = 100 * (dense_acc - lsq["accuracy"])
    measured = {r["label"]: r for r in l5["front"]["measured"]}
    u4 = measured["uniform 4-bit"]
    m4 = {o: measured[f"mixed[{o}] <= {l5['budgets'][3]} bits"] for o in OBJECTIVES}

    def beats(m):
        return m["size_bits"] <= u4["size_bits"] and m["measured_accuracy"] > u4["measured_accuracy"]

    def images(m):  # accuracy difference in test images
        return round(n_test * (m["measured_accuracy"] - u4["measured_accuracy"]))

    def file_change(m):
        return f"{100 * (m['dsk_bytes'] / u4['dsk_bytes'] - 1):+.0f} % file bytes"

    mixed_checks = "\n".join(
        f"| LeNet-5 mixed precision ({o} objective{', the default' if i == 0 else ''}) beats uniform 4-bit at equal "
        f"or smaller size | {100 * m4[o]['measured_accuracy']:.2f} % at {m4[o]['size_bits']:,} code bits, "
        f"{m4[o]['dsk_bytes']:,} B vs {100 * u4['measured_accuracy']:.2f} % at {u4['size_bits']:,} bits, "
        f"{u4['dsk_bytes']:,} B ({images(m4[o]):+d} test images, {file_change(m4[o])}) | "
        f"{'PASS' if beats(m4[o]) else 'FAIL'} |"
        for i, o in enumerate(OBJECTIVES))

    def acc_row(r):
        return (f"| {r['label']} | {100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - dense_acc):+.2f} | "
                f"{r['dsk_bytes']:,} | {r['gzip_bytes']:,} | {r['ratio']:.1f} |")

    def front_row(r):
        widths = ", ".join(f"{k}:{v}" for k, v in r["widths"].items())
        return (f"| {r['label']} | {widths} | {r['size_bits']:,} | {r['size_bits'] / l5['params']:.2f} | "
                f"{r['predicted_kl']:.5f} | {r['predicted_loss_delta']:.4f} | {100 * r['predicted_accuracy_drop']:.2f} | "
                f"{100 * r['measured_accuracy']:.2f} | {100 * (r['measured_accuracy'] - front_base):+.2f} | {r['dsk_bytes']:,} |")

    front_base = l5["front"]["baseline"]["accuracy"]
    margin = images(m4[OBJECTIVES[0]])
    noise_note = (f"The default objective's margin over uniform 4-bit is {margin:+d} test images of {n_test:,}: too few to "
                  f"call an accuracy gain from one run; what mixed precision buys here is the file size at that accuracy "
                  f"({file_change(m4[OBJECTIVES[0]])})." if abs(margin) < 20 else
                  f"The default objective's margin over uniform 4-bit is {margin:+d} test images of {n_test:,}.")
    mlp_dense = mlp["dense"]["accuracy"]

    def mlp_row(r):
        return (f"| {r['scheme']} | {r['bits']} | {r['finetune']} | {100 * (1 - r['accuracy']):.2f} | "
                f"{100 * (r['accuracy'] - mlp_dense):+.2f} | {r['dsk_bytes']:,} | {r['gzip_bytes']:,} | {r['ratio']:.1f} |")

    layer_names = list(l5["front"]["sensitivity"]["sizes"])
    front_points = {o: [[c["size_bits"], float(f"{c['predicted_kl']:.4g}"), float(f"{c['predicted_loss_delta']:.4g}"),
                         round(c["predicted_accuracy_drop"], 6), "/".join(str(c["widths"][n]) for n in layer_names)]
                        for c in points] for o, points in l5["front"]["front"].items()}
    timing_rows = "\n".join(f"| {k} | {'cached' if v is None else f'{v:.0f}'} |" for k, v in timings.items())
    sens = l5["front"]["sensitivity"]
    sens_rows = "\n".join(
        f"| {name} | {sens['sizes'][name]:,} | " + " | ".join(
            f"{sens['kl'][name][b]:.5f} / {sens['loss'][name][b] - sens['baseline_loss']:+.4f} / "
            f"{100 * (sens['accuracy'][name][b] - sens['baseline_accuracy']):+.2f}"
            for b in ("2", "3", "4", "5", "6", "8")) + " |"
        for name in sens["sizes"])
    return f"""# Low-bit weight quantization (weight-only, activations fp32)

{provenance(COMMAND, threads=THREADS)}
- data: MNIST, official 10,000-image test split for every accuracy; validation = 5,000 images held out of train
- runtime: eager PyTorch on the model *loaded back from its .dsk file* (weights decoded on load); every
  load checked bit-identical (logits of 1,000 test images) to the in-memory model
- dense models: trained once by this script ({DENSE_TRAIN['lenet-5'].epochs} epochs LeNet-5,
  {DENSE_TRAIN['lenet-300-100'].epochs} epochs LeNet-300-100, Adam 1e-3 cosine, seed 0) and cached in `bench/.cache/quant_lowbit/`;
  the dense rows below are measured in this run. One run per row, fixed seeds: no spread is reported.
- size: bytes of the `.dsk` file (and gzip -9 of it); ratio = 4 B x parameters / file bytes

## Checks

| claim | measured | verdict |
|---|---|---|
| LeNet-5 4-bit weight QAT (LSQ) loses <= 0.3 pt test accuracy vs dense | {100 * dense_acc:.2f} % -> {100 * lsq['accuracy']:.2f} % ({-qat_drop:+.2f} pt) | {"PASS" if qat_drop <= 0.3 else "FAIL"} |
{mixed_checks}

Artifact: `bench/artifacts/lenet-5-w4-qat.dsk` ({lsq['dsk_bytes']:,} bytes; `load_compressed` gives the eager model).

## (a) LeNet-5 ({l5['params']:,} parameters)

| model | test acc % | vs dense pt | .dsk bytes | gzip bytes | ratio |
|---|---:|---:|---:|---:|---:|
{chr(10).join(acc_row(r) for r in l5['rows'])}

PTQ = `WeightOnly(bits, symmetric=True, granularity="per_channel")`, min/max scales, no data.
QAT = `WeightQAT(bits=4, method, train=TrainConfig(epochs={QAT_EPOCHS}, lr=1e-4))` from the dense model, Adam, cosine, best val epoch kept.

### Mixed precision (PTQ, symmetric per-channel)

Per-layer sensitivity on the validation split with only that layer quantized: KL of the outputs from
the float model's / val loss change / accuracy change in pt (baseline val loss {sens['baseline_loss']:.4f},
accuracy {100 * sens['baseline_accuracy']:.2f} %):

| layer | weights | 2 | 3 | 4 | 5 | 6 | 8 |
|---|---:|---|---|---|---|---|---|
{sens_rows}

Widths chosen by exact DP (Pareto-front knapsack) minimising the sum of per-layer costs under a budget
on weight-code bits (sum of numel x bits; scales and biases excluded from the budget, included in .dsk
bytes); `mixed[kl]` sums the KL column, `mixed[loss]` the val-loss increases (clamped at 0; among
equal predicted costs the smaller model wins). Measured on the test split through the .dsk:

| point | widths | code bits | bits/param | predicted KL | predicted val-loss delta | predicted acc drop pt | test acc % | vs dense pt | .dsk bytes |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(front_row(r) for r in l5['front']['measured'])}

{noise_note}

The whole predicted Pareto front per objective ({", ".join(f"{o}: {len(p)} points" for o, p in front_points.items())}),
each point `[code bits, predicted KL, predicted val-loss delta, predicted accuracy drop, widths {"/".join(layer_names)}]`:

<details><summary>JSON</summary>

```json
{json.dumps(front_points, separators=(",", ":"))}
```
</details>

## (b) LeNet-300-100 ({mlp['params']:,} parameters): non-uniform vs uniform

One codebook per layer (all three layers quantized); fine-tuning = {FINETUNE_EPOCHS} epochs of Adam at 1e-4
(codebook schemes: the levels, by their members' summed gradients, plus the fp32 biases;
uniform: QAT with STE). Power-of-two is not fine-tuned: that would move its levels off the powers of two.

| scheme | bits | fine-tuning | test error % | vs dense pt acc | .dsk bytes | gzip bytes | ratio |
|---|---:|---|---:|---:|---:|---:|---:|
{chr(10).join(mlp_row(r) for r in mlp['rows'])}

Reading it: codes are entropy-coded, so equal widths give different files. Min/max uniform grids put
most weights on the few levels near 0 (fewer bits than the width); equal-population fills every level
equally by construction (about the full width). Symmetric min/max at 2 bits has levels
{{-2, -1, 0, 1}} x max|w| and power-of-two at 2 bits {{0, +-2^k}} with 2^k near max|w|: almost every weight
becomes 0, hence the tiny files and collapsed accuracy of those rows; per-channel scales, k-means,
or training (QAT, centroid fine-tuning) are what make 2 bits usable.

{grid_section(grid)}
## Wall time of this run (s, 1 thread, shared 2-core machine)

| step | s |
|---|---:|
{timing_rows}

## Not measured, and why

- Latency. Weight-only low-bit models run here as eager PyTorch with decoded fp32 weights, so
  every width has the same speed; a per-width latency needs low-bit kernels (e.g. XNNPACK's 4-bit
  weight GEMMs via ExecuTorch), which the export path does not lower to yet. The mixed-precision
  chooser takes a latency table and budget (tested on constructed timings) but none was measured.
- Accuracy in a mobile runtime: the `.dsk` is decoded into an eager PyTorch module; there is no
  `.pte`/`.onnx` lowering of low-bit weights in this work.
- Activations stay fp32 (weight-only); 8-bit activations are the int8 path's job.
- Spread over seeds: one run per row (the dense training alone is minutes per seed on one thread).
"""


if __name__ == "__main__":
    main()
