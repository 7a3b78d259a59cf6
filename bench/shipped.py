"""The shipped file: the whole chain (structured pruning, dead units cut, int8) in one runtime file.

    .venv/bin/python bench/shipped.py            # ~25 min on one thread; writes bench/results/shipped.md
                                                 # and bench/artifacts/{lenet-5,lenet-300-100}-shipped.*
                                                 # a second run reuses the models cached in bench/.cache and
                                                 # only rebuilds the files and measures (~5 min)

For LeNet-5 and LeNet-300-100 on MNIST: every candidate runtime file built from our smallest
models — LeNet-5 channel-pruned and fine-tuned by distillation (`LENET_VARIANT` of bench/lenet5_probe.py),
LeNet-300-100 the sparse-variational-dropout model with its dead units cut whose `.dsk` is
111x smaller than fp32 (bench/vd_probe.py, kl_weight 1.0; read from bench/artifacts/lenet-300-100-vd-kl1.dsk,
so the runtime file holds the same weights) — in fp32 and int8, as `.pte` and
`.onnx`, exported with a static batch of 1 (the phone's case: one delegate call); for both, `.onnx` files that
compute in fp32 from 8-bit (weight-only) and 4-bit (after 2 epochs of weight QAT, `LOWBIT_QAT`) weights, which the file
stores as codes (sparse where that is smaller) and ONNX Runtime decodes when it loads it (`deploy.onnx_storage`), and
an int8 `.onnx` of the 4-bit QAT weights (the int8 quantizer keeps their grid: `GridPreservingWeightObserver`); for LeNet-300-100
also with 4- and 8-bit weights the `.pte` stores and runs (`Int8DynamicLowBit`; the 4-bit per-channel file also
after 2 epochs of 4-bit weight QAT, `LOWBIT_QAT`, whose trained grid the `.pte` keeps), for LeNet-5 with
int8 only where each runtime (XNNPACK, ONNX Runtime) runs it faster (`deploy.objective`, the recipe's `objective: balanced`). Beside them, in
the same interleaved run: the dense model in eager PyTorch (the reference of every ratio), its
plain fp32 exports, ONNX Runtime's own `quantize_static` (QDQ, per channel) of the dense model,
our structured `.pte` of bench/structured.py, the `.dsk` files of the Deep Compression table and the `.onnx`
of each `.dsk`'s weights (the runtime file built from the same weights), and
a minimal program in each runtime (one fp32 Linear 784 -> 10): the order of any call's fixed cost
there (not a strict floor: its flatten and layout handling are not free). Error: the full 10,000-image test set through each file in its
own runtime. Latency: batch 1, one thread, each runtime's own call on bound inputs
(`Runner.call_for`), all files of a net interleaved in one run, in rounds of 100 calls of
one file (steady state) and again call by call (cold caches).

The shipped file of a net is, among the candidates within its error bound, the smallest file
whose median is within 5 % of the fastest candidate's (faster than that is noise between
interleaved runs); it is copied to bench/artifacts/ with its sidecar.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import time

import torch

from baselines import dense_baseline, mnist
from common import REPO, provenance
from lenet5_probe import pruned_lenet5
from ort_int8 import ort_quantize_static
from structured import DISTILL

from deepshrink.core.targets import get_target
from deepshrink.deploy import export
from deepshrink.deploy.objective import choose_by_latency
from deepshrink.evaluation.compare import evaluate_many
from deepshrink.models import load
from deepshrink.quantization import Int8DynamicLowBit, Int8Static, WeightOnly, WeightQAT, quantize
from deepshrink.training import TrainConfig, accuracy, fit

# LeNet-5: a milder cut than bench/structured.py's (there conv2 kept 16 and fine-tuned back to 0.84 % from
# the seeded baseline, over the 0.80 % bound), distilled from the dense model: the variant of
# bench/lenet5_probe.py with the lowest validation error (bench/results/lenet5_probe.md), its model cached there
LENET_VARIANT = "r60-e40-s1"
# both nets: 4-bit per-channel weight QAT (LSQ steps) of the small model, distilled from it (LeNet-300-100: before its 4-bit .pte)
LOWBIT_QAT = WeightQAT(bits=4, granularity="per_channel", method="lsq",
                       train=TrainConfig(epochs=2, lr=1e-4, batch_size=128, distill=DISTILL, seed=0))
THREADS = 1
RUNS, WARMUP = 3000, 300
BLOCK = 100   # calls of one file in a row per round: its steady state, as an app calling it in a loop sees it
ARTIFACTS = REPO / "bench" / "artifacts"
WORK = REPO / "bench" / ".cache" / "shipped"
BOUNDS = {"lenet-5": 0.80, "lenet-300-100": 1.64}          # test error %, the issue's (Han et al.'s) bounds
TARGETS = {"lenet-5": 0.06, "lenet-300-100": 0.10}         # latency as a fraction of dense fp32 eager
SMALL_DSK = {"lenet-300-100": "lenet-300-100-vd-kl1.dsk"}   # the smallest model, stored as .dsk
NOISE = 1.05                                               # medians within 5 % of the fastest count as tied
OBJECTIVE = "balanced"   # deploy.objective for the int8/fp32 mixes: the smallest file within its TIE (5 %) of the fastest, as NOISE


class Floor(torch.nn.Module):
    """The cheapest real program: one fp32 Linear on the flattened image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def small_model(name: str, dense: torch.nn.Module, data) -> torch.nn.Module:
    """Our smallest model of ``name`` in eager PyTorch (cached; seeded, so the same on every machine)."""
    if name == "lenet-300-100":
        return load(ARTIFACTS / SMALL_DSK[name]).eval()
    return pruned_lenet5(LENET_VARIANT, data)


def build(name: str, data) -> tuple[dict, dict]:
    """(candidate files by label, reference artifacts by label)."""
    dense, _ = dense_baseline(name, data)
    dense.eval()
    small = small_model(name, dense, data)
    example, x1 = data.example_input(64), data.example_input(1)
    calib = [data.calib[i][0] for i in range(64)]
    what = "structured" if name == "lenet-5" else "VD, dead units cut"
    candidates = {}
    for precision in ("fp32", "int8"):
        for suffix, target in ((".pte", "xnnpack"), (".onnx", "onnxruntime")):
            model = small if precision == "fp32" else quantize(copy.deepcopy(small), Int8Static(), data=data, target=target)
            path = WORK / f"{name}-small-{precision}{suffix}"
            export(model, path, example_input=x1, target=target, static_batch=True, parity_samples=calib)
            candidates[f"{what} {precision} {suffix}, static batch 1"] = path
    # weight QAT at 4 bits per channel (LSQ steps), distilled from the small model: its float weights on the grid
    trained4 = quantize(copy.deepcopy(small), LOWBIT_QAT, data=data, train_fn=fit, accuracy_fn=accuracy)
    # fp32 compute from low-bit weights: the .onnx stores the codes (deploy.onnx_storage) and ONNX Runtime decodes
    # them when it loads the file, so it runs the fp32 kernels at the low-bit file's size
    for label, model in (("8-bit per channel weights (weight-only)", quantize(copy.deepcopy(small), WeightOnly(bits=8), data=None)),
                         ("4-bit per channel weights after 4-bit weight QAT", trained4)):
        path = WORK / f"{name}-small-weights-{label.split()[0]}.onnx"
        export(model, path, example_input=x1, target="onnxruntime", static_batch=True, parity_samples=calib)
        candidates[f"{what} {label}, fp32 compute .onnx, static batch 1"] = path
    # int8 compute from the 4-bit QAT weights: the int8 quantizer keeps their grid (codes in [-7, 7]), stored at 4 bits
    path = WORK / f"{name}-small-qat4-int8.onnx"
    export(quantize(copy.deepcopy(trained4), Int8Static(), data=data, target="onnxruntime"), path, example_input=x1,
           target="onnxruntime", static_batch=True, parity_samples=calib)
    candidates[f"{what} 4-bit per channel weights after 4-bit weight QAT, int8 .onnx, static batch 1"] = path
    if name == "lenet-300-100":   # weights the .pte stores and runs at 4 / 8 bits (XNNPACK qb4w / qc8w, int8 activations)
        for label, config in (("4-bit groupwise (32)", Int8DynamicLowBit(bits=4, group_size=32)),
                              ("4-bit per channel", Int8DynamicLowBit(bits=4, group_size=None)),
                              ("8-bit per channel", Int8DynamicLowBit(bits=8, group_size=None))):
            path = WORK / f"{name}-small-{label.split()[0]}-{label.split()[1]}.pte".replace("(", "").replace(")", "")
            export(quantize(copy.deepcopy(small), config, data=None), path, example_input=x1, static_batch=True, parity_samples=calib)
            candidates[f"{what} {label} weights, int8 dynamic activations .pte, static batch 1"] = path
        # the same 4-bit per-channel file after weight QAT: the runtime keeps the trained grid (lowbit.runtime)
        path = WORK / f"{name}-small-4-bit-qat.pte"
        export(quantize(trained4, Int8DynamicLowBit(bits=4, group_size=None), data=None), path, example_input=x1,
               static_batch=True, parity_samples=calib)
        candidates[f"{what} 4-bit per channel weights after 4-bit weight QAT, int8 dynamic activations .pte, static batch 1"] = path
    else:   # int8 where each runtime runs it faster, measured per layer (deploy.objective; balanced: the smallest mix
            # within 5 % of the fastest, this script's own shipping rule)
        for suffix, target in ((".pte", "xnnpack"), (".onnx", "onnxruntime")):
            chosen, record = choose_by_latency(small, Int8Static(), lambda m, c: quantize(copy.deepcopy(m), c, data=data, target=target),
                                               example_input=example, target=get_target(target), objective=OBJECTIVE)
            path = WORK / f"{name}-small-objective-{OBJECTIVE}{suffix}"
            export(chosen, path, example_input=x1, target=target, static_batch=True, parity_samples=calib)
            fp32 = ", ".join(record["fp32_layers"]) or "none"
            candidates[f"{what}, objective {OBJECTIVE} ({record['chosen']}: fp32 {fp32}) {suffix}, static batch 1"] = path
    references: dict = {"dense fp32 eager (the reference)": dense}
    for suffix in (".pte", ".onnx"):
        path = WORK / f"{name}-dense-fp32{suffix}"
        export(dense, path, example_input=example)
        references[f"dense fp32 {suffix} (plain export)"] = path
    ort_path = WORK / f"{name}-dense-ort-qdq.onnx"
    ort_quantize_static(WORK / f"{name}-dense-fp32.onnx", ort_path, data, reduce_range=False)
    references["dense, ONNX Runtime quantize_static QDQ per channel"] = ort_path
    if name == "lenet-5":
        references["structured fp32 .pte of bench/structured.py (dynamic batch)"] = ARTIFACTS / "lenet-5-structured.pte"
    dsk = SMALL_DSK.get(name, f"{name}.dsk")
    references[f"`{dsk}` (eager; {'the same weights' if name in SMALL_DSK else 'Deep Compression, Han et al.'})"] = ARTIFACTS / dsk
    # the runtime file of the .dsk's own weights: its codebook indices and sparse positions stored in the .onnx
    path = WORK / f"{name}-dsk-weights.onnx"
    export(load(ARTIFACTS / dsk).eval(), path, example_input=x1, target="onnxruntime", static_batch=True, parity_samples=calib)
    references[f"`{dsk}`'s weights as .onnx (stored as codebook indices, fp32 compute), static batch 1"] = path
    torch.manual_seed(0)
    floor = Floor().eval()
    for suffix in (".pte", ".onnx"):
        path = WORK / f"floor{suffix}"
        export(floor, path, example_input=x1, static_batch=True)
        references[f"minimal program: one fp32 Linear 784->10 {suffix}"] = path
    return candidates, references


def error_pct(m) -> float:
    """Test error in %, rounded to the test set's resolution (0.01 % of 10,000 images): 80 errors are 0.80 %,
    not the 0.800002 of a float32 accuracy, which a bound of 0.80 would reject."""
    return round(100 * (1 - m.accuracy), 2)


def choose(name: str, measured: dict, candidates: dict) -> str:
    fine = [k for k in candidates if error_pct(measured[k]) <= BOUNDS[name]]
    if not fine:   # none within the bound: the best error is shipped, and the verdict says the bound was missed
        best = min(error_pct(measured[k]) for k in candidates)
        fine = [k for k in candidates if error_pct(measured[k]) <= best + 0.02]
    fastest = min(measured[k].latency_ms_median for k in fine)
    tied = [k for k in fine if measured[k].latency_ms_median <= NOISE * fastest]
    return min(tied, key=lambda k: measured[k].file_bytes)


def cold_latency(artifacts: dict, data) -> dict:
    """Per label, the median ms of ``RUNS`` calls with every call of every file interleaved (A B C A B C):
    each call finds the caches as the other files left them."""
    from deepshrink.core.samples import stack
    from deepshrink.core.timing import torch_threads
    from deepshrink.evaluation.metrics import interleaved_latency
    from deepshrink.evaluation.runners import open_runner

    x1 = stack([data.test[0][0]])
    with torch_threads(THREADS):
        calls = [open_runner(a, threads=THREADS).call_for(x1) for a in artifacts.values()]
        timed = interleaved_latency(calls, runs=RUNS, warmup=WARMUP, block=1)
    return {label: t["latency_ms_median"] for label, t in zip(artifacts, timed)}


def table(measured: dict, reference, cold: dict) -> list[str]:
    eager = cold["dense fp32 eager (the reference)"]
    rows = ["| variant | runtime | test error % | file B | zstd B | gzip B | median µs | p90 µs | × dense eager "
            "| cold median µs | cold × eager |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, m in measured.items():
        error = "—" if label.startswith("minimal") else f"{error_pct(m):.2f}"
        size = lambda v: "—" if v is None else f"{v:,}"  # noqa: E731
        rows.append(f"| {label} | {m.runtime} | {error} | {size(m.file_bytes)} | {size(m.zstd_bytes)} | {size(m.gzip_bytes)} | "
                    f"{m.latency_ms_median * 1e3:.1f} | {m.latency_ms_p90 * 1e3:.1f} | "
                    f"{m.latency_ms_median / reference.latency_ms_median:.3f} | "
                    f"{cold[label] * 1e3:.1f} | {cold[label] / eager:.3f} |")
    return rows


def verdicts(name: str, shipped: str, measured: dict, candidates: dict, cold: dict) -> list[str]:
    m, eager = measured[shipped], measured["dense fp32 eager (the reference)"]
    ratio, err = m.latency_ms_median / eager.latency_ms_median, error_pct(m)
    cold_ratio = cold[shipped] / cold["dense fp32 eager (the reference)"]
    runtime_files = {k: v for k, v in measured.items()   # what a runtime loads: .pte and .onnx (a .dsk runs only in our loader)
                     if v.runtime in ("executorch", "onnxruntime") and not k.startswith("minimal")
                     and error_pct(v) <= max(BOUNDS[name], err)}   # as accurate as needed, or as the shipped file
    smallest = min(runtime_files, key=lambda k: runtime_files[k].file_bytes)
    floor = measured[f"minimal program: one fp32 Linear 784->10 .{'pte' if m.runtime == 'executorch' else 'onnx'}"]
    lines = [
        f"- error <= {BOUNDS[name]:.2f} %: {'reached' if err <= BOUNDS[name] else 'missed'} ({err:.2f} % in {m.runtime}).",
        f"- latency <= {TARGETS[name]:.2f}x dense fp32 eager: {'reached' if ratio <= TARGETS[name] else 'missed'} ({ratio:.3f}x: "
        f"{m.latency_ms_median * 1e3:.1f} µs vs {eager.latency_ms_median * 1e3:.1f} µs; a minimal program in this runtime, one "
        f"fp32 Linear 784->10, takes {floor.latency_ms_median * 1e3:.1f} µs = {floor.latency_ms_median / eager.latency_ms_median:.3f}x).",
        f"- the same, every call interleaved (cold caches): {'reached' if cold_ratio <= TARGETS[name] else 'missed'} "
        f"({cold_ratio:.3f}x: {cold[shipped] * 1e3:.1f} µs vs {cold['dense fp32 eager (the reference)'] * 1e3:.1f} µs).",
        f"- the smallest runtime file in the table within the error bound: {'yes' if smallest == shipped else 'no, ' + smallest}; "
        f"zstd {m.zstd_bytes:,} B, gzip {m.gzip_bytes:,} B of {m.file_bytes:,} B.",
    ]
    if name == "lenet-5":
        today = measured["structured fp32 .pte of bench/structured.py (dynamic batch)"]
        qdq = measured["dense, ONNX Runtime quantize_static QDQ per channel"]
        s_today, s_qdq = today.latency_ms_median / m.latency_ms_median, qdq.latency_ms_median / m.latency_ms_median
        lines += [f"- >= 2x faster than our structured fp32 .pte: {'reached' if s_today >= 2 else 'missed'} ({s_today:.2f}x).",
                  f"- >= 3.5x faster than ONNX Runtime's QDQ: {'reached' if s_qdq >= 3.5 else 'missed'} ({s_qdq:.2f}x)."]
    return lines


def sparse_lines(name: str) -> list[str]:
    """What runs sparse: the .dsk's per-layer dense-vs-CSR timing (measured when it was exported), and
    that the runtime files compute dense."""
    from deepshrink.formats.sidecar import read_sidecar

    dsk = SMALL_DSK.get(name, f"{name}.dsk")
    rows = (read_sidecar(ARTIFACTS / dsk) or {}).get("sparse_compute") or []
    decided = "; ".join(f"{r['layer']} {100 * r['sparsity']:.1f} % zeros: dense {r['dense_us']:.1f} µs vs CSR {r['sparse_us']:.1f} µs"
                        f" -> {'sparse' if r['runs_sparse'] else 'dense'}" for r in rows if r["dense_us"] == r["dense_us"])
    return [f"Sparse compute: the `.pte` and `.onnx` files above run dense kernels — ExecuTorch's XNNPACK delegate "
            f"does not set XNNPACK's sparse-inference flag, and ONNX Runtime's CPU provider has no sparse kernel for "
            f"weights — so no runtime file claims sparse speed. Sparse storage is another matter: the `.onnx` files store "
            f"pruned and low-bit weights as their nonzero codes (`deploy.onnx_storage`; each file's sidecar lists them under "
            f"`stored_weights`), and ONNX Runtime rebuilds the dense weights when it loads the file. `{dsk}` (eager) times each pruned Linear dense against "
            f"torch CSR at batch 1 when it is written and keeps CSR only where it measured faster: "
            f"{decided or 'no layer sparse enough to try'}."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nets", nargs="*", default=list(BOUNDS), choices=list(BOUNDS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    WORK.mkdir(parents=True, exist_ok=True)
    data = mnist()
    header = provenance("python bench/shipped.py", THREADS)   # before the artifacts below are replaced: the commit as run
    started = time.perf_counter()
    sections = []
    for name in args.nets:
        candidates, references = build(name, data)
        measured = evaluate_many({**candidates, **references}, data.test, threads=THREADS, latency_runs=RUNS, warmup=WARMUP,
                                 latency_block=BLOCK)
        cold = cold_latency({**candidates, **references}, data)
        shipped = choose(name, measured, candidates)
        target = ARTIFACTS / f"{name}-shipped{candidates[shipped].suffix}"
        for stale in ARTIFACTS.glob(f"{name}-shipped.*"):
            stale.unlink()
        shutil.copyfile(candidates[shipped], target)
        shutil.copyfile(candidates[shipped].with_name(candidates[shipped].name + ".json"), target.with_name(target.name + ".json"))
        print(f"{name}: shipped {shipped} -> {target.name}", flush=True)
        sections.append((name, shipped, target, measured, candidates, cold))
    total = time.perf_counter() - started
    out = ["# The shipped file: the whole chain in one runtime file, measured beside the peers", "",
           header,
           f"- total wall time {total / 60:.1f} min; one run, seed 0 everywhere; no spread measured beyond p90",
           "- latency: batch 1, each runtime's own call on inputs and outputs bound once (`Runner.call_for`: ExecuTorch "
           "`Method.execute`, ONNX Runtime `run_with_iobinding`, eager under `inference_mode`), "
           f"{RUNS} calls of every file of a net after {WARMUP} warm-up calls each, interleaved in one run in rounds of "
           f"{BLOCK} calls of one file (its steady state: an app calling its model in a loop; the median, p90 and "
           "× columns, and the shipping rule), then again with every call interleaved (A B C A B C: each call finds "
           "the caches as the other files of the table left them; the cold columns)",
           "- error: the official 10,000-image MNIST test set through each file in its own runtime",
           f"- shipped: among the candidates within the error bound, the smallest file whose median is within "
           f"{100 * (NOISE - 1):.0f} % of the fastest candidate's", ""]
    for name, shipped, target, measured, candidates, cold in sections:
        out += [f"## {name}", "", f"Shipped: **{shipped}** -> `bench/artifacts/{target.name}`. Reproduce its error: "
                f"`deepshrink evaluate bench/artifacts/{target.name} --data mnist --data-dir ../shared/data/mnist`.", ""]
        out += table(measured, measured["dense fp32 eager (the reference)"], cold) + [""]
        out += verdicts(name, shipped, measured, candidates, cold) + [""]
        out += sparse_lines(name) + [""]
    (REPO / "bench" / "results" / "shipped.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
