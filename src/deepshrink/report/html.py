"""The HTML report: one file, images inline, every number taken from ``metrics.json``."""
from __future__ import annotations

import html
import json
from pathlib import Path

from deepshrink.core.io import atomic_write_text
from deepshrink.report.plots import accuracy_vs_size, sensitivity_curves

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{background:#fff8e1;padding:8px 12px;border-left:4px solid #f0b400}
code{background:#f3f3f3;padding:1px 4px}.bad{background:#fde2e2;color:#a00;font-weight:bold}
.alarm{background:#fde2e2;padding:8px 12px;border-left:4px solid #c00;color:#700}
"""


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "kib":
        return f"{value / 1024:,.1f}"
    if kind == "ms":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _variants_table(variants: dict[str, dict]) -> str:
    rows = []
    for label, v in variants.items():
        sparsity = None
        if v.get("params") and v.get("nonzero_params") is not None:
            sparsity = 1 - v["nonzero_params"] / v["params"]
        rows.append([
            html.escape(label), html.escape(v["runtime"]), _fmt(v["accuracy"], "pct"), _fidelity_cell(v.get("fidelity")),
            _fmt(v.get("file_bytes"), "kib"),
            _fmt(v.get("zstd_bytes"), "kib"), _fmt(v.get("gzip_bytes"), "kib"), _fmt(v.get("params")), _fmt(v.get("nonzero_params")), _fmt(sparsity, "pct"),
            _fmt(v.get("macs")), _fmt(v.get("latency_ms_median"), "ms"), _fmt(v.get("latency_ms_p90"), "ms"),
            _parity_cell(v),
        ])
    return _table(["variant", "runtime", "test accuracy", "fidelity to fp32 (in this runtime)", "file KiB", "zstd KiB (download)", "gzip KiB", "params", "non-zero", "zeros",
                   "MACs", "latency median ms", "p90 ms", "export parity (file vs module)"], rows)


def _shipped_section(shipped: dict | None, variants: dict[str, dict]) -> list[str]:
    """The file to ship, measured in its runtime, first: what the run is for."""
    if not shipped or shipped.get("variant") not in variants:
        return ["<h2>Shipped</h2><p class='note'>No runtime file to ship: none was exported, or none passed its parity check.</p>"]
    label = shipped["variant"]
    return [f"<h2>Shipped: {html.escape(label)}</h2>",
            f"<p>Objective <code>{html.escape(shipped['objective'])}</code>: {html.escape(shipped['why'])}.</p>",
            _variants_table({label: variants[label]})]


def _fidelity_cell(f: dict | None) -> str:
    if not f:
        return "—"
    keys = [k for k in f if k not in ("kind", "samples", "headline", "value", "outputs", "user")]
    text = ", ".join(f"{k} {_fmt(f[k])}" for k in keys)
    return html.escape(f"{f['kind']}: {text}" + (f"; user: {f['user']}" if f.get("user") else ""))


def _parity_cell(v: dict) -> str:
    """Each parity check of an exported variant; a failed one in red."""
    checks = v.get("parity")
    if not checks:
        return _fmt(v.get("parity_max_abs_diff"))
    parts = []
    for c in checks:
        figure = f"p99 {c['p99_steps']:.2f} steps" if c.get("p99_steps") is not None else f"|Δ|max {c['max_abs_diff']:.3g}"
        if c.get("argmax_agreement") is not None:
            figure += f", top-1 {100 * c['argmax_agreement']:.1f} %"
        text = html.escape(f"{c['runtime']}: {figure}")
        parts.append(text if c.get("passed", True) else f"<span class='bad'>{text} FAILED</span>")
    return "<br>".join(parts)


def _stage_sections(stages: list[dict]) -> str:
    parts = []
    rows = [[str(s["index"] + 1), html.escape(next(iter(s["stage"]))), _fmt(s["seconds"]),
             html.escape(s["summary"].get("line", ""))] for s in stages]
    parts.append(_table(["#", "stage", "seconds", "result"], rows))
    for s in stages:
        layers = s["summary"].get("layers") if isinstance(s["summary"], dict) else None
        if layers:
            layer_rows = [[html.escape(n), _fmt(d["kept"]), _fmt(d["total"]), _fmt(1 - d["kept"] / d["total"], "pct")]
                          for n, d in layers.items()]
            sens = s["summary"].get("sensitivity")
            if sens:
                plot = sensitivity_curves(sens["curves"], sens["proposed"])
                parts.append(f"<h3>Pruning, stage {s['index'] + 1}: sensitivity</h3><img alt='sensitivity' src='{plot}'>"
                             f"<p>Predicted accuracy drop of the proposal: {100 * sens['predicted_drop']:.2f} pt "
                             "(per-layer drops added, linear between measured points).</p>")
            parts.append(f"<h3>Pruning, stage {s['index'] + 1}: per layer</h3>")
            parts.append(_table(["layer", "kept", "total", "sparsity"], layer_rows))
    for s in stages:
        objective = s["summary"].get("objective") if isinstance(s["summary"], dict) else None
        if objective and objective.get("per_layer") is not None:
            parts.append(f"<h3>Objective {html.escape(objective['objective'])}: int8 or fp32, measured in "
                         f".{html.escape(objective['runtime_format'])} at batch 1 — chose the {html.escape(objective['chosen'])} model</h3>")
            parts.append(_table(["file", "median µs", "bytes"], [
                [html.escape(k), _fmt(1e3 * f["latency_ms_median"]), _fmt(f["file_bytes"])] for k, f in objective["files"].items()]))
            parts.append(_table(["layer", "int8 file µs", "same file, this layer fp32 µs", "layer runs"], [
                [html.escape(d["layer"]), _fmt(1e3 * d["int8_ms"]), _fmt(1e3 * d["with_it_fp32_ms"]),
                 "fp32 (faster here)" if d["fp32"] else "int8"] for d in objective["per_layer"]]))
    for s in stages:
        mixed = s["summary"].get("mixed_precision") if isinstance(s["summary"], dict) else None
        if mixed and mixed.get("steps"):
            parts.append(_mixed_precision(mixed))
    for s in stages:
        guard = s["summary"].get("weight_range") if isinstance(s["summary"], dict) else None
        if guard and guard.get("narrowed"):
            parts.append(_weight_range(guard))
    for s in stages:
        rounding = s["summary"].get("recurrent_rounding") if isinstance(s["summary"], dict) else None
        if rounding and rounding.get("applied"):
            parts.append(_recurrent_rounding(rounding))
    for s in stages:
        exports = s["summary"].get("exports") if isinstance(s["summary"], dict) else None
        for label, info in (exports or {}).items():
            if info.get("sparse_compute"):
                parts.append(f"<h3>Sparse compute, {html.escape(label)}: measured per layer at batch 1</h3>")
                parts.append(_table(["layer", "sparsity", "dense µs", "CSR µs", "runs"], [
                    [html.escape(d["layer"]), _fmt(d["sparsity"], "pct"), _fmt(d["dense_us"]), _fmt(d["sparse_us"]),
                     "sparse" if d["runs_sparse"] else "dense"] for d in info["sparse_compute"]]))
    return "".join(parts)


def _mixed_precision(mixed: dict) -> str:
    """The sensitivity measured for mixed precision: every round's candidates, the pick, the check."""
    before, after = mixed["fidelity_before"], mixed.get("fidelity_after")
    verdict = ("kept" if mixed["kept"] else "not kept") + (
        f": output SQNR {_fmt(after['sqnr_db'])} dB with them float, {_fmt(before['sqnr_db'])} dB int8 everywhere"
        if after else f": int8 everywhere ({_fmt(before['sqnr_db'])} dB)")
    parts = [f"<h3>Mixed precision by measured sensitivity: {html.escape(', '.join(mixed['chosen']) or 'no layer')} "
             f"in float — {html.escape(verdict)}</h3>",
             f"<p>Each round measures every int8 layer in float on the calibration samples (output SQNR against the float "
             f"model); the largest gain is kept. Stopped: {html.escape(mixed['stopped'])}. Extra bytes "
             f"{_fmt(mixed['extra_bytes'])} of a budget of {_fmt(mixed['budget_bytes'])}.</p>"]
    for i, rows in enumerate(mixed["steps"]):
        ranked = sorted(rows, key=lambda r: -(r["gain_db"] if r["gain_db"] is not None else -1e9))
        picked = mixed["chosen"][i] if i < len(mixed["chosen"]) else None
        parts.append(_table([f"round {i + 1}: layer", "output SQNR gain dB", "extra bytes", "decision"], [
            [html.escape(r["layer"]), "—" if r["gain_db"] is None else _fmt(r["gain_db"]), _fmt(r["extra_bytes"]),
             "float" if r["layer"] == picked else html.escape(r.get("skipped", "int8"))] for r in ranked]))
    return "".join(parts)


def _weight_range(record: dict) -> str:
    """The saturation guard of the ``*-guarded`` int8 layouts: which layers lost a bit, and why."""
    from deepshrink.quantization.weight_range import weight_range_line

    parts = [f"<h3>int8 weights held to 7 bits where x86 ONNX Runtime without VNNI would clip: "
             f"{_fmt(record['narrowed'])} of {_fmt(record['channels'])} channels</h3>",
             f"<p>{html.escape(weight_range_line(record))}.</p>"]
    rows = sorted(record["layers"].items(), key=lambda kv: -kv[1]["narrowed"] / kv[1]["channels"])
    parts.append(_table(["layer", "node", "channels", "7-bit channels", "share", "largest pair sum at 8 bits"], [
        [html.escape(d.get("layer", node)), html.escape(node), _fmt(d["channels"]), _fmt(d["narrowed"]),
         _fmt(d["narrowed"] / d["channels"], "pct"), _fmt(d["peak"])] for node, d in rows]))
    return "".join(parts)


def _recurrent_rounding(record: dict) -> str:
    """GPTQ re-rounding of the int8 LSTM/GRU matrices: each matrix's held-out error, the check."""
    before, after = record["fidelity_before"]["sqnr_db"], record["fidelity_after"]["sqnr_db"]
    verdict = "kept" if record["kept"] else "not kept (nearest rounding stays)"
    parts = [f"<h3>Recurrent cells: GPTQ rounding of the int8 weight matrices — {verdict}</h3>",
             f"<p>Output SQNR against the float model on the calibration samples: {_fmt(after)} dB re-rounded, "
             f"{_fmt(before)} dB with nearest rounding. Error ratio: each matrix's output error on calibration "
             "samples it was not fitted to, against nearest rounding's; input scale α: the first layer's input "
             "channels scaled by their mean magnitude to the power α before its rows are quantized.</p>"]
    parts.append(_table(["matrix", "input scale α", "error ratio", "codes"], [
        [html.escape(m["matrix"]), _fmt(m["alpha"]) if m["alpha"] else "—", _fmt(m["error_ratio"]),
         "GPTQ" if m["gptq"] else "nearest"] for m in record["matrices"]]))
    return "".join(parts)


def render_report(document: dict, *, title: str) -> str:
    variants = document.get("variants", {})
    plot = accuracy_vs_size(variants)
    env = document.get("environment", {})
    checks = document.get("checks", {})
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Created {html.escape(document.get('created', ''))}. Data: <code>{html.escape(document.get('data', {}).get('name', ''))}</code> "
        f"splits {html.escape(json.dumps(document.get('data', {}).get('splits', {})))}; accuracy is on the full test split, "
        "measured through each file in its own runtime.</p>",
        *_shipped_section(document.get("shipped"), variants),
        "<h2>Variants</h2>", _variants_table(variants),
        "".join(f'<p class="{"alarm" if n.startswith("PARITY FAILED") else "note"}">{html.escape(n)}</p>'
                for n in document.get("notes", [])),
        f"<p>CPU: {html.escape(env.get('cpu', '?'))} ({html.escape(env.get('cpu_arch', '?'))}); ISA features found: "
        f"{html.escape(', '.join(env.get('cpu_features') or []) or 'none of AVX2, AVX-512, VNNI, AMX, NEON, dotprod')}; "
        f"threads: {env.get('threads')}; batch 1; {packages}.</p>",
    ]
    if plot:
        sections.append(f'<h2>Accuracy against size</h2><img alt="accuracy against size" src="{plot}">')
    if checks:
        sections.append("<h2>Checks</h2>" + _table(["check", "value"], [[html.escape(k), _fmt(v)] for k, v in checks.items()]))
    sections.append("<h2>Stages</h2>" + _stage_sections(document.get("stages", [])))
    sections.append("<h2>Recipe</h2><pre>" + html.escape(json.dumps(document.get("recipe", {}), indent=2)) + "</pre>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"


def write_report(document: dict, path: str | Path, *, title: str) -> Path:
    return atomic_write_text(path, render_report(document, title=title))
