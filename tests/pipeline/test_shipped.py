"""The shipped row: the one runtime file a run recommends, chosen by the recipe's objective from measured variants."""
from deepshrink.pipeline.metrics_doc import choose_shipped
from deepshrink.report.html import render_report


def _variant(fmt: str, size: int, ms: float | None, *, role: str = "compressed", passed: bool | None = True) -> dict:
    return {"role": role, "format": fmt, "runtime": {"pte": "executorch", "onnx": "onnxruntime", "eager": "pytorch"}[fmt],
            "file_bytes": size if fmt != "eager" else None, "latency_ms_median": ms, "latency_ms_p90": ms, "accuracy": 0.98,
            "fidelity": None, "parity": None, "parity_passed": passed}


VARIANTS = {
    "fp32 eager": _variant("eager", 0, 0.400, role="fp32", passed=None),
    "fp32 .pte": _variant("pte", 400_000, 0.100, role="fp32"),                 # never shipped: not compressed
    "compressed eager (simulated quantized)": _variant("eager", 0, 0.300, passed=None),
    "compressed .pte": _variant("pte", 110_000, 0.0300),
    "compressed .onnx": _variant("onnx", 100_000, 0.0400),
}


def test_each_objective_ships_what_it_says():
    assert choose_shipped(VARIANTS, "size")["variant"] == "compressed .onnx"            # 100,000 B < 110,000 B
    assert choose_shipped(VARIANTS, "latency")["variant"] == "compressed .pte"          # 30 µs < 40 µs
    # balanced: the .onnx is 33 % slower than the fastest, outside 5 %: the .pte
    assert choose_shipped(VARIANTS, "balanced")["variant"] == "compressed .pte"
    close = {**VARIANTS, "compressed .onnx": _variant("onnx", 100_000, 0.0310)}       # 3.3 % slower: within 5 %
    assert choose_shipped(close, "balanced")["variant"] == "compressed .onnx"
    shipped = choose_shipped(close, "balanced")
    assert shipped["why"] == ("the smallest runtime file (100,000 B) within 5% of the fastest (31.0 µs against 30.0 µs) "
                              "whose export parity passed, of 2 candidates")


def test_a_file_that_failed_parity_is_never_shipped_and_none_is_said_so():
    failed = {**VARIANTS, "compressed .onnx": _variant("onnx", 100_000, 0.0400, passed=False)}
    assert choose_shipped(failed, "size")["variant"] == "compressed .pte"
    nothing = {k: v for k, v in VARIANTS.items() if v["format"] == "eager"}
    assert choose_shipped(nothing, "size") is None
    html = render_report({"variants": nothing, "shipped": None}, title="t")
    assert "No runtime file to ship" in html


def test_the_report_puts_the_shipped_file_first():
    document = {"variants": VARIANTS, "shipped": choose_shipped(VARIANTS, "size")}
    html = render_report(document, title="t")
    assert html.index("<h2>Shipped: compressed .onnx</h2>") < html.index("<h2>Variants</h2>")
    assert "Objective <code>size</code>: the smallest runtime file (100,000 B) whose export parity passed, of 2 candidates." in html
