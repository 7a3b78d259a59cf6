"""Low-bit weights in the .pte and the .onnx: LeNet-300-100 on digits as fp32, int8-static, and Int8DynamicLowBit.

    .venv/bin/python bench/lowbit_pte.py [--runs 2000]

Writes bench/results/lowbit_pte.md. The model is trained once (fixed seed, a few epochs on digits);
every variant is exported as .pte (XNNPACK), and fp32, 4-bit g32 and 8-bit per channel as .onnx too
(ONNX Runtime; 4-bit layers as ``MatMulNBits`` at accuracy_level 0, 8-bit ones on the float path:
``deploy.onnx_lowbit``), and both low-bit .onnx once more with ``MatMulNBits`` at accuracy_level 4
(the choice not made, measured; exported with parity "warn", its verdict in the table). Accuracy is measured on the digits test split in each file's runtime, and batch-1
latency timed with one thread: all files interleaved call by call (``core.timing.time_calls``) on
each runtime's own call (``Runner.call_for``: ExecuTorch's ``execute``, ORT's IO binding), the median
of ``--runs`` calls each. The CPU's SIMD flags are read from ``lscpu`` on the machine that runs it.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import tempfile
from unittest import mock
from pathlib import Path

import torch

from common import REPO, provenance

import deepshrink
from deepshrink.core.timing import time_calls
from deepshrink.data import load as load_data
from deepshrink.deploy import export, onnx_lowbit
from deepshrink.evaluation.runners import open_runner
from deepshrink.models.zoo import create
from deepshrink.quantization import Int8Static
from deepshrink.quantization.lowbit import Int8DynamicLowBit
from deepshrink.training import TrainConfig, fit

RESULT = REPO / "bench" / "results" / "lowbit_pte.md"
COMMAND = ".venv/bin/python bench/lowbit_pte.py"
THREADS = 1
ONNX_VARIANTS = ("fp32", "4-bit g32 (Int8DynamicLowBit())", "8-bit per channel (bits=8)")   # also exported as .onnx
VARIANTS = {
    "fp32": None,
    "int8-static (Int8Static)": Int8Static(),
    "4-bit g32 (Int8DynamicLowBit())": Int8DynamicLowBit(bits=4, group_size=32),
    "4-bit per channel (group_size=None)": Int8DynamicLowBit(bits=4, group_size=None),
    "8-bit per channel (bits=8)": Int8DynamicLowBit(bits=8),
    "mixed 4/8/float (hidden.0: 4, hidden.1: 8, classifier: None)":
        Int8DynamicLowBit(layers={"hidden.0": 4, "hidden.1": 8, "classifier": None}),
}


def simd_flags() -> list[str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return [f for f in flags if "avx512" in f or "vnni" in f or f.startswith("amx") or f in ("avx2", "fma")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    data = load_data("digits")
    torch.manual_seed(0)
    model = create("lenet-300-100")
    fit(model, data, TrainConfig(epochs=5, lr=1e-3, batch_size=64, seed=0), progress=False)
    model.eval()
    test_x, test_y = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
    with torch.no_grad():
        float_top1 = model(test_x).argmax(1)
    scratch = Path(tempfile.mkdtemp(prefix="lowbit_pte-"))
    rows, runners = [], []

    def measure(name: str, result) -> None:
        runner = open_runner(result.path, threads=THREADS)
        top1 = runner.predict(test_x).argmax(1)
        rows.append({"name": name, "format": result.path.suffix, "bytes": result.file_bytes,
                     "accuracy": float((top1 == test_y).float().mean()), "agreement": float((top1 == float_top1).float().mean()),
                     "parity": result.parity[0].max_abs_diff, "parity_passed": result.parity_passed, "runs": _runs(result.path)})
        runners.append(runner)

    for i, (name, config) in enumerate(VARIANTS.items()):
        quantized = copy.deepcopy(model) if config is None else deepshrink.quantize(copy.deepcopy(model), config, data=data)
        for suffix in (".pte", ".onnx") if name in ONNX_VARIANTS else (".pte",):
            measure(name, export(quantized, scratch / f"v{i}{suffix}", example_input=test_x[:64]))
            if suffix == ".onnx" and config is not None:   # the other accuracy_level, measured: see deploy.onnx_lowbit
                with mock.patch.dict(onnx_lowbit.ACCURACY_LEVEL, {config.bits: 4}):
                    result = export(quantized, scratch / f"v{i}-level4.onnx", example_input=test_x[:64], parity="warn")
                measure(f"{name}, MatMulNBits accuracy_level 4 (opt-in)", result)
    one = test_x[:1]
    times = time_calls([r.call_for(one) for r in runners], runs=args.runs, warmup=100)
    for row, t in zip(rows, times, strict=True):
        row["ms"] = statistics.median(t)
    RESULT.write_text(report(rows, len(test_y), args.runs))
    print(RESULT.read_text())


def _runs(path: Path) -> str:
    """.pte: the ops outside the XNNPACK delegate; .onnx: the GEMM ops and the low-bit kernel's settings."""
    import json

    if path.suffix == ".pte":
        side = json.loads(path.with_name(path.name + ".json").read_text())
        outside = side.get("delegation", {}).get("outside_delegate", {})
        return "outside delegate: " + (", ".join(f"{k}×{v}" for k, v in outside.items()) or "none")
    import onnx

    counts, settings = {}, set()
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in ("MatMulNBits", "Gemm", "MatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            settings.add(f"{a['bits']}-bit, block {a['block_size']}, accuracy_level {a['accuracy_level']}")
    return ", ".join(f"{k}×{v}" for k, v in counts.items()) + (f" ({'; '.join(sorted(settings))})" if settings else "")


def report(rows: list[dict], n_test: int, runs: int) -> str:
    fp32 = {r["format"]: r for r in rows if r["name"] == "fp32"}
    lines = ["# Low-bit weights in the .pte and the .onnx (LeNet-300-100, digits)", "", provenance(COMMAND, THREADS),
             f"- lscpu SIMD flags: {' '.join(simd_flags()) or 'none of avx2/avx512/vnni/amx'}", "",
             f"Accuracy and agreement with the fp32 model's top-1 on the {n_test}-image digits test split, in the file's "
             f"runtime (ExecuTorch for .pte, ONNX Runtime for .onnx); latency: batch 1, median of {runs} interleaved calls; "
             "× fp32: against the fp32 file of the same format; parity: max |Δ| of the file against its module on 64 "
             "test images, (failed) where the export's parity gate failed.", "",
             "| variant | format | file bytes | × fp32 | test acc | top-1 = fp32 | batch-1 ms | × fp32 | parity max abs diff | runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: r["format"] != ".pte"):
        base = fp32[r["format"]]
        lines.append(f"| {r['name']} | {r['format']} | {r['bytes']:,} | {r['bytes'] / base['bytes']:.3f} | {r['accuracy']:.1%} | "
                     f"{r['agreement']:.1%} | {r['ms']:.4f} | {r['ms'] / base['ms']:.2f} | {r['parity']:.2g}"
                     f"{'' if r['parity_passed'] else ' (failed)'} | {r['runs']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
