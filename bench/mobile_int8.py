"""Issue 5, item 7: int8 on a depthwise-heavy net, in the .pte runtime.

    .venv/bin/python bench/mobile_int8.py      # writes bench/results/mobile_int8.md

The zoo's mobile-cnn (inverted residuals, depthwise 3x3, BatchNorm, ReLU6, a residual add and a
concat) trained on Fashion-MNIST; W8A8 PTQ variants exported to .pte and compared with the fp32 .pte
on every test image (prediction agreement), with the per-layer SQNR report of our default.
"""
from __future__ import annotations

import copy

import torch

from common import REPO, SHARED_DATA, provenance

import deepshrink as ds
from deepshrink.models import create, load, save_checkpoint
from deepshrink.quantization import Int8Static, layer_sqnr_report
from deepshrink.quantization.report import format_report
from deepshrink.training import TrainConfig, accuracy

CACHE = REPO / "bench" / ".cache" / "mobile_int8"


def predictions(path, data) -> torch.Tensor:
    from deepshrink.evaluation.runners import open_runner

    runner = open_runner(path)
    return torch.cat([runner.predict(x).argmax(1) for x, _ in data.loader("test", batch_size=256)])


def main() -> None:
    torch.set_num_threads(1)
    data = ds.data.load("fashion-mnist", data_dir=SHARED_DATA / "fashion-mnist")
    dense_path = CACHE / "mobile-cnn-fashion.safetensors"
    if dense_path.is_file():
        model = load(dense_path)
    else:
        model = create("mobile-cnn")
        ds.fit(model, data, TrainConfig(epochs=4, lr=2e-3, batch_size=128, seed=0), progress=False)
        save_checkpoint(model, dense_path)
    model.eval()
    example = data.example_input(64)
    ds.export(model, CACHE / "fp32.pte", example_input=example)
    reference = predictions(CACHE / "fp32.pte", data)
    labels = torch.cat([y for _, y in data.loader("test", batch_size=256)])
    variants = {
        "W8A8 per-channel, histogram (default: fused conv+BN+ReLU6, padding folded)": Int8Static(),
        "W8A8 per-channel, percentile 99.99": Int8Static(calibration="percentile"),
        "W8A8 per-channel, histogram + CLE (ReLU6 as ReLU) + bias correction": Int8Static(equalization="cle_relu6_as_relu", bias_correction=True),
        "W8A8 per-channel, minmax": Int8Static(calibration="minmax"),
    }
    rows, report = [], None
    for label, config in variants.items():
        quantized = ds.quantize(copy.deepcopy(model), config, data=data)
        path = CACHE / f"{len(rows)}.pte"
        ds.export(quantized, path, example_input=example)
        preds = predictions(path, data)
        agree = float((preds == reference).float().mean())
        acc = float((preds == labels).float().mean())
        rows.append(f"| {label} | {100 * acc:.2f} | {100 * agree:.2f} | {path.stat().st_size:,} |")
        if report is None:
            report = format_report(layer_sqnr_report(model, quantized, data))
        print(rows[-1], flush=True)
    fp32_acc = float((reference == labels).float().mean())
    text = f"""# Int8 on a depthwise-heavy CNN (mobile-cnn, Fashion-MNIST), in ExecuTorch

{provenance("python bench/mobile_int8.py", threads=1)}
- model: zoo `mobile-cnn` ({sum(p.numel() for p in model.parameters()):,} parameters), trained 4 epochs (Adam 2e-3, cosine, seed 0)
- agreement: share of the 10,000 test images where the int8 .pte predicts the same class as the fp32 .pte
  (target >= 99 %); accuracy against the labels beside it; one run

| variant | int8 .pte accuracy % | agreement with fp32 .pte % | .pte bytes |
|---|---:|---:|---:|
| fp32 .pte (reference) | {100 * fp32_acc:.2f} | 100.00 | {(CACHE / 'fp32.pte').stat().st_size:,} |
{chr(10).join(rows)}

Per-layer SQNR of the default variant (signal-to-quantization-noise of each layer's output against
fp32; "alone": only that layer quantized), on 256 calibration images:

```
{report}
```
"""
    (REPO / "bench" / "results" / "mobile_int8.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
