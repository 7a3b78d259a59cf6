"""PTQ repairs (cross-layer equalization, AdaRound, bias correction, mixed precision) on the zoo's mobile-cnn, in both runtimes.

    .venv/bin/python bench/repairs.py      # ~12-15 min on a shared 2-core machine; writes bench/results/repairs.md

The dense zoo ``mobile-cnn`` trained on Fashion-MNIST (3 epochs, 1 thread, seed 0; cached in
bench/.cache/repairs), then ``Int8Static`` (histogram calibration, 256 calibration samples from the
train split) with each repair setting on and off — none, ``cle``, bias correction, both,
``cle_relu6_as_relu``, it plus bias correction, AdaRound (``rounding="adaround"``), AdaRound plus
bias correction, mixed precision by measured sensitivity (``MixedPrecision()``), AdaRound plus it — quantized once for XNNPACK (exported .pte) and
once for ONNX Runtime (exported .onnx). Each repair is guarded inside ``quantize`` (kept only if
int8 fidelity to the float model on the calibration samples does not drop); the table records what
the guard did. Every file, and the fp32 .pte and .onnx of the dense model, is measured in its
runtime in one ``evaluate_many`` call: top-1 agreement with the fp32 model and test accuracy on the
full 10,000-image test split, file bytes, batch-1 latency (1 thread, interleaved).
Each repaired file is also paired with the unrepaired one of its runtime, image by image: the images it fixed and
broke, and an exact sign test on them, so that a difference of a few images is not read as a repair's effect.
"""
from __future__ import annotations

import copy
import hashlib
import time
from collections import Counter

import torch

from common import REPO, SHARED_DATA, provenance, sign_test

import deepshrink
from deepshrink.deploy import export
from deepshrink.evaluation.compare import evaluate_many
from deepshrink.evaluation.metrics import eval_batches, run_outputs
from deepshrink.evaluation.runners import open_runner
from deepshrink.quantization.mixed_precision import mixed_precision_line
from deepshrink.models import create, load, save_checkpoint
from deepshrink.quantization import Int8Static, MixedPrecision, quantize
from deepshrink.training import TrainConfig, accuracy, fit

THREADS = 1
CACHE = REPO / "bench" / ".cache" / "repairs"
CHECKPOINT = CACHE / "mobile-cnn-fashion-mnist.safetensors"
TRAIN = TrainConfig(epochs=3, lr=2e-3, batch_size=128, seed=0)
LATENCY_RUNS, WARMUP = 300, 30
TARGET_AGREEMENT = 0.995
SETTINGS = {
    "none": {},
    "`cle`": {"equalization": "cle"},
    "bias correction": {"bias_correction": True},
    "`cle` + bias correction": {"equalization": "cle", "bias_correction": True},
    "`cle_relu6_as_relu`": {"equalization": "cle_relu6_as_relu"},
    "`cle_relu6_as_relu` + bias correction": {"equalization": "cle_relu6_as_relu", "bias_correction": True},
    "AdaRound": {"rounding": "adaround"},
    "AdaRound + bias correction": {"rounding": "adaround", "bias_correction": True},
    "mixed precision": {"mixed_precision": MixedPrecision()},
    "AdaRound + mixed precision": {"rounding": "adaround", "mixed_precision": MixedPrecision()},
}
TARGETS = {"xnnpack": ".pte", "onnxruntime": ".onnx"}
RUNTIME = {"xnnpack": "ExecuTorch (XNNPACK)", "onnxruntime": "ONNX Runtime"}


def trained(data) -> tuple[torch.nn.Module, float | None]:
    """(the dense model, training seconds or None when read from the cache)."""
    if CHECKPOINT.is_file():
        return load(CHECKPOINT).eval(), None
    torch.manual_seed(0)
    model = create("mobile-cnn")
    started = time.perf_counter()
    fit(model, data, TRAIN, progress=False)
    seconds = time.perf_counter() - started
    save_checkpoint(model, CHECKPOINT)
    return model.eval(), seconds


def guard_summary(record: dict) -> str:
    """What the guard did, from ``q._deepshrink_quant``: CLE pairs equalized / skipped, kept or
    dropped; bias correction kept or dropped."""
    parts = []
    eq = record.get("equalization") or {}
    if eq.get("mode", "none") != "none":
        pairs, skipped = eq.get("pairs", []), eq.get("skipped", [])
        # the reason up to its first colon: "clip to [0.0, 6.0] is not scale-equivariant", "output used more than once"
        reasons = Counter(s.get("reason", "?").split(":")[0] for s in skipped)
        why = "; ".join(f"{n}× {reason}" for reason, n in reasons.items())
        if not pairs:
            verdict = "nothing to equalize"
        else:
            verdict = "kept by the guard" if eq.get("applied") else "dropped by the guard"
        parts.append(f"CLE: {len(pairs)} pairs equalized, {len(skipped)} skipped{f' ({why})' if why else ''} — {verdict}"
                     + (" (float model changed)" if eq.get("applied") and eq.get("changes_float_model") else ""))
    ada = record.get("adaround")
    if ada is not None:
        rows = ada.get("layers", [])
        parts.append(f"AdaRound: {'kept' if ada.get('kept') else 'dropped'} by the guard ({sum(r['learned_kept'] for r in rows)} of "
                     f"{len(rows)} layers re-rounded, {sum(r['changed_codes'] for r in rows):,} of {sum(r['weights'] for r in rows):,} codes moved)")
    bc = record.get("bias_correction")
    if bc is not None:
        parts.append(f"bias correction: {'kept' if bc.get('kept') else 'dropped'} by the guard ({len(bc.get('layers', []))} layers)")
    mixed = record.get("mixed_precision")
    if mixed is not None:
        parts.append(f"mixed precision: {mixed_precision_line(mixed)}")
    return "; ".join(parts) if parts else "— (no repair asked)"


def guard_fidelity(record: dict) -> str:
    """The guard's own check on the calibration samples, as it recorded it."""
    def fmt(f: dict | None) -> str:
        if not f:
            return "—"
        agreement = f.get("agreement")
        return (f"{100 * agreement:.2f} % / " if agreement is not None else "") + f"{f['sqnr_db']:.1f} dB"

    parts = []
    eq = record.get("equalization") or {}
    if eq.get("fidelity_with") is not None:
        parts.append(f"CLE with {fmt(eq['fidelity_with'])}, without {fmt(eq['fidelity_without'])}")
    ada = record.get("adaround")
    if ada is not None:
        parts.append(f"AdaRound with {fmt(ada.get('fidelity_after'))}, nearest rounding {fmt(ada.get('fidelity_before'))}")
    bc = record.get("bias_correction")
    if bc is not None:
        parts.append(f"bias correction after {fmt(bc.get('fidelity_after'))}, before {fmt(bc.get('fidelity_before'))}"
                     + (f" (fitted on one half, scored on the other: after {fmt(bc['fidelity_held_out_after'])}, "
                        f"before {fmt(bc['fidelity_held_out_before'])})" if bc.get("fidelity_held_out_after") else ""))
    return "; ".join(parts)


def top1(path, batches: list) -> torch.Tensor:
    """Every test image's top-1 through the file in its runtime."""
    return torch.cat([o[0].argmax(-1) for o in run_outputs(open_runner(path, threads=THREADS), batches)])


def main() -> None:
    torch.set_num_threads(THREADS)
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    header = provenance("python bench/repairs.py", THREADS)
    data = deepshrink.data.load("fashion-mnist", data_dir=SHARED_DATA / "fashion-mnist")
    model, train_s = trained(data)
    eager_acc = accuracy(model, data.loader("test", batch_size=1000))
    print(f"dense mobile-cnn: eager test accuracy {100 * eager_acc:.2f} %, trained in {train_s} s", flush=True)
    example = data.example_input(64)

    files, rows = {}, []
    for target, suffix in TARGETS.items():
        path = CACHE / f"mobile-cnn-fp32{suffix}"
        export(model, path, example_input=example, target=target)
        files[f"fp32{suffix}"] = path
        rows.append({"label": f"fp32{suffix}", "setting": "fp32 (no quantization)", "target": target, "summary": "—",
                     "guard": "", "quantize_s": None, "parity": "passed"})
    for target, suffix in TARGETS.items():
        for setting, kwargs in SETTINGS.items():
            config = Int8Static(**kwargs)
            t0 = time.perf_counter()
            q = quantize(copy.deepcopy(model), config, data=data, target=target)
            quantize_s = time.perf_counter() - t0
            record = q._deepshrink_quant
            eq, bc = record.get("equalization"), record.get("bias_correction")
            print(f"[{target}] {setting}: quantize {quantize_s:.1f} s; equalization keys {sorted(eq or {})}; "
                  f"bias_correction keys {sorted(bc) if bc else None}", flush=True)
            print(f"    equalization: { {k: v for k, v in (eq or {}).items() if k not in ('pairs',)} }", flush=True)
            if record.get("adaround"):
                print(f"    adaround: { {k: v for k, v in record['adaround'].items() if k != 'layers'} }", flush=True)
            if bc:
                print(f"    bias_correction: { {k: v for k, v in bc.items() if k != 'layers'} }", flush=True)
            label = f"{setting} {suffix}"
            slug = "-".join(k if isinstance(v, MixedPrecision) else f"{k}={v}" for k, v in kwargs.items()) or "none"
            path = CACHE / f"mobile-cnn-int8-{slug}{suffix}"
            # parity="warn": a file off the module's outputs is still measured (and the miss reported) instead of lost
            result = export(q, path, example_input=example, target=target, parity="warn")
            files[label] = path
            rows.append({"label": label, "setting": setting, "target": target, "summary": guard_summary(record),
                         "guard": guard_fidelity(record), "quantize_s": quantize_s,
                         "parity": "passed" if result.parity_passed else "FAILED: " + "; ".join(f"{p.runtime}: {', '.join(p.failures)} ({p.summary()})" for p in result.parity if not p.passed)})
    print(f"quantized and exported {len(files)} files in {time.perf_counter() - started:.0f} s; measuring", flush=True)
    measured = evaluate_many(files, data.test, threads=THREADS, latency_runs=LATENCY_RUNS, warmup=WARMUP, reference=model)
    total = time.perf_counter() - started

    def agreement(label: str) -> float:
        return measured[label].fidelity["top1_agreement"]

    n_test = measured["fp32.pte"].test_samples
    # paired against "none" of the same runtime: which images each repair fixed and broke
    batches = eval_batches(data.test)[0]
    with torch.no_grad():
        fp32_top1 = torch.cat([model(b).argmax(-1) for b in batches])
    right = {label: top1(path, batches) == fp32_top1 for label, path in files.items()}
    paired = {}
    for r in rows:
        if r["quantize_s"] is not None and r["setting"] != "none":
            base, this = right[f"none {TARGETS[r['target']]}"], right[r["label"]]
            fixed, broken = int((~base & this).sum()), int((base & ~this).sum())
            paired[r["label"]] = (fixed, broken, sign_test(fixed, broken))
    lines = []
    for r in rows:
        m = measured[r["label"]]
        agree = agreement(r["label"])
        qs = "—" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        pair = "—" if r["label"] not in paired else "{} / {} (p {:.2f})".format(*paired[r["label"]])
        lines.append(
            f"| {r['setting']} | {RUNTIME[r['target']]} | {r['summary']} | {100 * agree:.2f} ({round((1 - agree) * m.test_samples)}) | "
            f"{pair} | {100 * m.accuracy:.2f} | {qs} | "
            f"{m.file_bytes:,} | {m.latency_ms_median * 1e3:.1f} |")

    verdicts = []
    for target, suffix in TARGETS.items():
        int8 = [r for r in rows if r["target"] == target and r["quantize_s"] is not None]
        low = [(r["setting"], agreement(r["label"])) for r in int8 if agreement(r["label"]) < TARGET_AGREEMENT]
        worst = min(int8, key=lambda r: agreement(r["label"]))
        verdicts.append(
            f"- {RUNTIME[target]}: top-1 agreement >= {100 * TARGET_AGREEMENT:.1f} % in every int8 row: "
            + ("reached" if not low else "missed") + f" (lowest {100 * agreement(worst['label']):.2f} %, {worst['setting']}"
            + (f"; below: {', '.join(f'{s} {100 * a:.2f} %' for s, a in low)}" if low else "") + ").")
        best = max(int8, key=lambda r: agreement(r["label"]))
        verdicts.append(
            f"- {RUNTIME[target]}: the most faithful int8 file >= {100 * TARGET_AGREEMENT:.1f} %: "
            + ("reached" if agreement(best["label"]) >= TARGET_AGREEMENT else "missed")
            + f" ({best['setting']}, {100 * agreement(best['label']):.2f} %).")
    for target, suffix in TARGETS.items():
        base = agreement(f"none {suffix}")
        lower = [(s, agreement(f"{s} {suffix}")) for s in SETTINGS if s != "none" and agreement(f"{s} {suffix}") < base]
        verdicts.append(
            f"- {RUNTIME[target]}: no repair lowers agreement vs \"none\" ({100 * base:.2f} %): "
            + ("reached" if not lower else "missed (" + ", ".join(
                f"{s} {100 * a:.2f} %, {round((base - a) * n_test)} more images disagree" for s, a in lower).replace(" disagree, ", " disagree; ") + ")") + ".")
        worse = [(s, paired[f"{s} {suffix}"]) for s in SETTINGS if s != "none"
                 and paired[f"{s} {suffix}"][1] > paired[f"{s} {suffix}"][0] and paired[f"{s} {suffix}"][2] < 0.05]
        verdicts.append(
            f"- {RUNTIME[target]}: no repair lowers agreement vs \"none\" beyond chance (sign test on the images the two files "
            "disagree on, p < 0.05): " + ("reached" if not worse else "missed (" + "; ".join(
                f"{s}: {f} fixed, {b} broken, p {p:.3f}" for s, (f, b, p) in worse) + ")") + ".")

    # rows whose files are byte-identical (the guard dropped the repair, or there was nothing to do): the same
    # model measured in different slots of the interleaved run, so their latency spread is noise and order alone
    digests: dict[str, list[str]] = {}
    for label, path in files.items():
        digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(label)
    same_lines = []
    for labels in digests.values():
        if len(labels) > 1:
            lat = [measured[label].latency_ms_median * 1e3 for label in labels]
            same_lines.append(f"- {', '.join(labels)}: one file (sha256 equal); median µs {' / '.join(f'{v:.1f}' for v in lat)} "
                              f"(spread {100 * (max(lat) - min(lat)) / min(lat):.0f} %)")
    guard_lines = [f"- {r['setting']}, {RUNTIME[r['target']]}: {r['guard']}" for r in rows if r["guard"]]
    parity_lines = [f"- {r['label']}: {r['parity']}" for r in rows if r["parity"] != "passed"]
    trained_how = (f"trained in this run ({train_s / 60:.1f} min)" if train_s is not None
                   else f"read from `{CHECKPOINT.relative_to(REPO)}`, trained by an earlier run of this script")
    text = f"""# PTQ repairs on mobile-cnn: int8 .pte and .onnx agreement with fp32, each repair on and off

{header}
- total wall time of the run {total / 60:.1f} min; one run, seed 0, no spread measured

## Model

Zoo `mobile-cnn` (`deepshrink.models.create("mobile-cnn")`, {sum(p.numel() for p in model.parameters()):,} parameters: ReLU6 after
every expand, depthwise and the head), dense, on Fashion-MNIST: `fit` with `{TRAIN}`, `torch.manual_seed(0)` before
`create`, {THREADS} thread; {trained_how}. fp32 test accuracy (eager PyTorch, {n_test:,} test images):
**{100 * eager_acc:.2f} %**; through the fp32 files in their runtimes: see the fp32 rows.

Quantization: `Int8Static` (histogram calibration, 256 calibration samples from the train split, per-channel and layout
as each target sets them: `s8s8` for XNNPACK, `u8s8-guarded` for ONNX Runtime), `quantize(copy.deepcopy(model), config,
data=data, target=...)` then `export(q, path, example_input=data.example_input(64), target=...)`. Each repair is guarded:
kept only if the int8 model's fidelity to the float model on the 256 calibration samples does not drop — top-1 agreement
AND output SQNR both at least as high as without it (`quantization.bias_correction.no_worse`); bias correction, fitted to
those samples, must also pass that check fitted on each half of them and scored on the other; AdaRound is judged after
the equalization decision, bias correction after both. Mixed precision (`MixedPrecision()`: at most 3 layers, each
gaining >= 0.5 dB of output SQNR, within 25 % more weight bytes) measures every int8 layer in float on the calibration
samples after the other repairs, re-quantizes with the chosen ones float and keeps that if the output SQNR rose
(`quantization.mixed_precision`). "quantize s" is the wall time of the `quantize` call (calibration and guards included), 1 thread, shared machine.

## Results

Agreement and accuracy: all {n_test:,} images of the official test split, run through each file in its runtime; agreement is
against the fp32 PyTorch model, with the count of images whose top-1 differs in brackets. "vs none": of the images on which
a repaired file and the unrepaired file of the same runtime differ, how many the repair fixed (now agreeing with fp32)
and broke, and the two-sided exact sign test's p: the chance of a split at least that uneven if neither file were the
better (a handful of images either way is what a different calibration set or CPU moves). Latency: batch 1, {THREADS} thread,
median of {LATENCY_RUNS} calls after {WARMUP} warm-up, all {len(files)} files interleaved in one run.

| repair setting | runtime | repair applied? (guard) | top-1 agreement with fp32 % (disagreeing images) | vs "none": images fixed / broken (sign test p) | test accuracy % | quantize s | file bytes | median µs |
|---|---|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(lines)}

The guard's own check (int8 vs float on the 256 calibration samples: top-1 agreement / SQNR), as recorded in
`q._deepshrink_quant`:

{chr(10).join(guard_lines)}

Byte-identical files among the rows (the same model in different slots of the latency run: their latency spread is
what noise and position alone do on this machine):

{chr(10).join(same_lines) if same_lines else "- none"}

Export parity (each file against its module on the example batch): {"passed for every file" if not parity_lines else "failures:"}
{chr(10).join(parity_lines)}

## Verdicts

{chr(10).join(verdicts)}

## Not measured

- Spread over seeds or calibration sets: one run, seed 0.
- Phone latency: this is an x86 server CPU (see the header), absolute microseconds do not transfer.
- p90 latency and gzip size are not in the table (measured by `evaluate_many` but not asked for).
- Other quantizers (ONNX Runtime's `quantize_static`, torch's `quantize_dynamic`) are not rows here: this table compares
  deepshrink's repairs against deepshrink's own unrepaired PTQ; bench/results/ort_int8.md has ORT's quantizer beside ours.
"""
    out = REPO / "bench" / "results" / "repairs.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
