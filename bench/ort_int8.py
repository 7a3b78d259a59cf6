"""Int8 layouts in ONNX Runtime, on this CPU and on x86 without VNNI (emulated exactly).

    .venv/bin/python bench/ort_int8.py      # writes bench/results/ort_int8.md

LeNet-5 on MNIST and the zoo's mobile-cnn on Fashion-MNIST (2 epochs each, cached in
bench/.cache/ort_int8), W8A8 PTQ (histogram calibration, 256 samples) in each int8 layout of
``core.targets.INT8_LAYOUTS``, exported to .onnx. For each: top-1 agreement with the simulated
(PyTorch fake-quantized) model on the full test set in ONNX Runtime on this CPU and in the exact
emulation of ONNX Runtime's AVX2 u8 x s8 kernel (``quantization.saturation``), saturated pair
sums, test accuracy, and batch-1 latency (1 thread, interleaved with the fp32 .onnx in one run).
ONNX Runtime's own ``quantize_static`` (QDQ, per channel, with and without ``reduce_range``) on
the fp32 .onnx stands beside ours, same calibration images.
"""
from __future__ import annotations

import copy
import statistics

import numpy as np
import torch

from common import REPO, SHARED_DATA, provenance

import deepshrink as ds
from deepshrink.core.targets import INT8_LAYOUTS, SATURATION_SAFE_LAYOUTS
from deepshrink.evaluation.metrics import interleaved_latency
from deepshrink.evaluation.runners import open_runner
from deepshrink.models import create, load, save_checkpoint
from deepshrink.quantization import Int8Static
from deepshrink.quantization.saturation import emulate_x86_without_vnni
from deepshrink.training import TrainConfig

CACHE = REPO / "bench" / ".cache" / "ort_int8"
NETS = {"lenet-5": "mnist", "mobile-cnn": "fashion-mnist"}
RUNS, WARMUP = 400, 50


def trained(name: str, data) -> torch.nn.Module:
    path = CACHE / f"{name}.safetensors"
    if path.is_file():
        return load(path).eval()
    torch.manual_seed(0)
    model = create(name)
    ds.fit(model, data, TrainConfig(epochs=2, lr=2e-3, batch_size=128, seed=0), progress=False)
    save_checkpoint(model, path)
    return model.eval()


def test_inputs(data) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x, y) for x, y in data.loader("test", batch_size=1000)])
    return torch.cat(xs), torch.cat(ys)


def batched(fn, x: torch.Tensor, size: int = 500) -> torch.Tensor:
    return torch.cat([fn(part) for part in x.split(size)])


class CalibReader:
    """ONNX Runtime's calibration interface over the same calibration images we use."""

    def __init__(self, data, name: str) -> None:
        self.items = iter([{name: x.unsqueeze(0).numpy()} for x, _ in data.calib])

    def get_next(self):
        return next(self.items, None)


def ort_quantize_static(fp32_path, out_path, data, *, reduce_range: bool) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepped = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepped))
    name = ort.InferenceSession(str(prepped), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    quantize_static(str(prepped), str(out_path), CalibReader(data, name), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    prepped.unlink()


def bench_net(name: str) -> tuple[str, list[str]]:
    data = ds.data.load(NETS[name], data_dir=SHARED_DATA / NETS[name])
    model = trained(name, data)
    x, labels = test_inputs(data)
    example = torch.stack([data.test[i][0] for i in range(64)])
    fp32_path = CACHE / f"{name}-fp32.onnx"
    ds.export(model, fp32_path, example_input=example, target="onnxruntime")
    with torch.no_grad():
        fp32_top1 = batched(model, x).argmax(1)
    rows, files = [], {"fp32 .onnx": fp32_path}
    for layout in INT8_LAYOUTS:
        q = ds.quantize(copy.deepcopy(model), Int8Static(int8_layout=layout), data=data, target="onnxruntime")
        path = CACHE / f"{name}-{layout}.onnx"
        ds.export(q, path, example_input=example, target="onnxruntime", parity="warn")
        files[layout] = path
        with torch.no_grad():
            simulated = batched(q, x).argmax(1)
        runner = open_runner(path)
        real = batched(runner.predict, x).argmax(1)
        emulated, saturated, pairs = [], 0, 0
        for part in x.split(500):
            out, report = emulate_x86_without_vnni(q, part)
            emulated.append(out.argmax(1))
            saturated, pairs = saturated + report.total_saturated, pairs + report.total_pairs
        emulated = torch.cat(emulated)
        rows.append({
            "config": f"ours, `{layout}`" + (" (cannot saturate)" if layout in SATURATION_SAFE_LAYOUTS else ""),
            "file": path, "acc_sim": float((simulated == labels).float().mean()),
            "acc_rt": float((real == labels).float().mean()), "acc_emu": float((emulated == labels).float().mean()),
            "agree_rt": float((real == simulated).float().mean()), "agree_emu": float((emulated == simulated).float().mean()),
            "agree_fp32": float((real == fp32_top1).float().mean()),
            "saturated": f"{saturated:,} of {pairs:,}" if pairs else "0 (u8 x u8 kernel)",
        })
        print(name, rows[-1], flush=True)
    for reduce_range in (False, True):
        label = f"ORT `quantize_static` QDQ S8S8 per-channel{', reduce_range' if reduce_range else ''}"
        path = CACHE / f"{name}-ort{'-rr' if reduce_range else ''}.onnx"
        ort_quantize_static(fp32_path, path, data, reduce_range=reduce_range)
        files[label] = path
        real = batched(open_runner(path).predict, x).argmax(1)
        rows.append({"config": label, "file": path, "acc_sim": None, "acc_rt": float((real == labels).float().mean()),
                     "acc_emu": None, "agree_rt": None, "agree_emu": None,
                     "agree_fp32": float((real == fp32_top1).float().mean()), "saturated": "not emulated (ORT's graph)"})
        print(name, rows[-1], flush=True)
    runners = {label: open_runner(path) for label, path in files.items()}
    lat = interleaved_latency([r.call_for(x[:1].contiguous()) for r in runners.values()], runs=RUNS, warmup=WARMUP)
    by_label = dict(zip(runners, lat))
    fp32_ms = by_label["fp32 .onnx"]["latency_ms_median"]
    keys = list(files)[1:]
    pct = lambda v: "—" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"| {r['config']} | {pct(r['acc_sim'])} | {pct(r['acc_rt'])} | {pct(r['agree_rt'])} | {pct(r['acc_emu'])} | "
             f"{pct(r['agree_emu'])} | {pct(r['agree_fp32'])} | {r['saturated']} | {r['file'].stat().st_size:,} | "
             f"{by_label[k]['latency_ms_median'] * 1e3:.1f} | {fp32_ms / by_label[k]['latency_ms_median']:.2f}x |"
             for r, k in zip(rows, keys)]
    fp32_acc = float((fp32_top1 == labels).float().mean())
    header = (f"### {name} on {NETS[name]} ({sum(p.numel() for p in model.parameters()):,} parameters; fp32 test accuracy "
              f"{100 * fp32_acc:.2f} %, fp32 .onnx {fp32_path.stat().st_size:,} B, {fp32_ms * 1e3:.1f} µs)")
    return header, lines


def main() -> None:
    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    sections = []
    for name in NETS:
        header, lines = bench_net(name)
        sections.append(header + """

| configuration | simulated acc % | ORT acc % (this CPU) | ORT top-1 = simulated % | emulated no-VNNI acc % | emulated top-1 = simulated % | ORT top-1 = fp32 % | saturated pair sums (emulated) | bytes | median µs | fp32 / int8 |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
""" + "\n".join(lines))
    text = f"""# Int8 layouts in ONNX Runtime: right on every x86 CPU, and what each costs

{provenance("python bench/ort_int8.py", threads=1)}
- one run; full official test sets (10,000 images); latency: batch 1, 1 thread, {RUNS} interleaved calls
  after {WARMUP} warm-up, median; "fp32 / int8" is the fp32 .onnx's median over this row's, same run
- "emulated no-VNNI": the exact integer arithmetic of ONNX Runtime's AVX2 u8 x s8 GEMM (pairs of
  products summed into a saturating int16, `vpmaddubsw`), applied to our quantized graph; it is what an
  x86 CPU without VNNI computes, measurable on any CPU. It does not model ORT's own `quantize_static`
  graphs (their rows show ORT on this CPU only).
- latency on this CPU only: an AVX2-only CPU runs different int8 kernels, so the speed column does not
  transfer to it; the accuracy and agreement columns of the emulation do.

{(chr(10) + chr(10)).join(sections)}
"""
    (REPO / "bench" / "results" / "ort_int8.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
