"""The seed example, done right.

The snippet this project answers trained a 784-256-10 MLP, called
``prune.l1_unstructured(fc1, amount=0.5)`` and then ``quantize_dynamic`` on the Linear layers —
but it imported from ``torchquantization`` (no such module), dropped the model that
``quantize_dynamic`` returns, put QuantStub/DeQuantStub into a model it quantized dynamically
(stubs are for static quantization), and never made the pruning permanent (the
``weight_orig``/``weight_mask`` pair stayed, so the "pruned" model was bigger).

What it meant, with deepshrink on MNIST: train, prune 50 % of fc1 by |w| (its own layer, L1),
fine-tune with the mask held, make the pruning permanent, quantize the Linear layers to int8
(static W8A8 with calibration: this is what XNNPACK runs on a phone), keep the returned model,
export to ExecuTorch and ONNX, and measure each file in its own runtime.

    python examples/seed_example.py --data-dir ../shared/data/mnist --out out/seed
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepshrink as ds
from deepshrink.data.splits import DataSplits
from deepshrink.pruning import MagnitudePruning
from deepshrink.training import TrainConfig


def subset(data: DataSplits, train: int, test: int) -> DataSplits:
    from torch.utils.data import Subset

    return DataSplits(
        name=data.name, train=Subset(data.train, range(min(train, len(data.train)))), val=data.val,
        test=Subset(data.test, range(min(test, len(data.test)))), calib=data.calib,
        input_shape=data.input_shape, num_classes=data.num_classes,
    )


def run(data: DataSplits, out: Path, *, epochs: int = 3, finetune_epochs: int = 1, latency_runs: int = 200) -> dict:
    model = ds.models.create("seed-mlp")                      # 784-256-10; fc1 is "hidden.0"
    ds.fit(model, data, TrainConfig(epochs=epochs, lr=1e-3), progress=False)
    dense = ds.evaluate(model, data.test, latency_runs=0)

    # prune.l1_unstructured(fc1, amount=0.5): half of fc1's weights, by |w|, within that layer
    model = ds.prune(model, MagnitudePruning(sparsity=0.5, scope="local", layers=("hidden.0",)))   # in place; returned
    report = ds.prune_report(model)
    ds.fit(model, data, TrainConfig(epochs=finetune_epochs, lr=3e-4), progress=False)   # the module holds the mask
    ds.finalize(model)                                        # permanent: zeros stay, masks go

    # keep the returned model; one file for ExecuTorch and one for ONNX Runtime from the same weights:
    # 7-bit weights, which XNNPACK runs and ORT's x86 kernels cannot saturate on CPUs without VNNI
    quantized = ds.quantize(model, ds.Int8Static(int8_layout="s8s8-reduced"), data=data)
    example = data.example_input(32)
    results = {"dense_eager_accuracy": dense.accuracy, "fc1_kept": report.layers["hidden.0"]}
    artifacts = {"simulated int8 (PyTorch)": quantized}
    for suffix in ("pte", "onnx"):
        path = out / f"seed-mlp-int8.{suffix}"
        ds.export(quantized, path, example_input=example)
        artifacts[f"int8 .{suffix}"] = path
    from deepshrink.evaluation.compare import evaluate_many

    measured = evaluate_many(artifacts, data.test, latency_runs=latency_runs, warmup=min(20, latency_runs))
    results["variants"] = {label: m.as_dict() for label, m in measured.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--out", default="out/seed")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data = ds.data.load("mnist", data_dir=args.data_dir)
    results = run(data, Path(args.out), epochs=args.epochs)
    print(f"dense fp32 eager accuracy: {100 * results['dense_eager_accuracy']:.2f} %")
    print(f"fc1 kept {results['fc1_kept'][0]:,} of {results['fc1_kept'][1]:,} weights")
    for label, v in results["variants"].items():
        size = f"{v['file_bytes']:,} B" if v["file_bytes"] else "-"
        print(f"{label:26s} {v['runtime']:12s} accuracy {100 * v['accuracy']:.2f} %  size {size}  "
              f"latency {v['latency_ms_median']:.3f} ms (batch 1, 1 thread)")
    from deepshrink.core.cpu import cpu_info

    print(f"CPU: {cpu_info().describe()}. {cpu_info().int8_caveat()}")
    Path(args.out, "seed_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
