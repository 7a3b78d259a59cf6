"""Every committed benchmark artifact reproduces the numbers its results table claims.

Each row: the artifact, its dataset, the test error (%), non-zero parameter count and file size
stated in bench/results/*.md. Measured here in the artifact's own runtime on the full official test split.
"""
from pathlib import Path

import pytest

from deepshrink.data import load
from deepshrink.evaluation import evaluate

ARTIFACTS = Path(__file__).resolve().parents[2] / "bench" / "artifacts"

CLAIMS = [
    # (file, dataset, test error %, non-zero parameters or None, file bytes or None, results table)
    ("lenet-300-100-pruned.dsk", "mnist", 1.64, 13_720, None, "pruning.md"),
    ("lenet-5-w4-qat.dsk", "mnist", 0.74, 335_532, None, "quant_lowbit.md"),
    ("lenet-5-w8a8.pte", "mnist", 0.77, None, None, "quant_int8.md"),
    ("lenet-300-100.dsk", "mnist", 1.51, None, 13_330, "deep_compression.md"),
    ("lenet-300-100-vd.dsk", "mnist", 1.51, None, 13_330, "deep_compression.md"),
    ("lenet-300-100-vd-kl1.dsk", "mnist", 1.50, None, 9_573, "vd_probe.md"),
    ("lenet-300-100-han.dsk", "mnist", 1.71, None, 18_528, "deep_compression.md"),
    ("lenet-5-structured.pte", "mnist", 0.71, None, None, "structured.md"),
    ("lenet-5.dsk", "mnist", 0.79, None, 29_743, "deep_compression.md"),
    ("lenet-5-han.dsk", "mnist", 0.79, None, 29_743, "deep_compression.md"),
    ("lenet-5-vd.dsk", "mnist", 0.93, None, 9_603, "deep_compression.md"),
    ("lenet-5-shipped.onnx", "mnist", 0.80, None, 26_558, "shipped.md"),
    ("lenet-300-100-shipped.onnx", "mnist", 1.62, None, 14_679, "shipped.md"),
]


@pytest.mark.parametrize("name, dataset, error, nonzero, size, table", CLAIMS, ids=[c[0] for c in CLAIMS])
def test_artifact_reproduces_its_claim(name, dataset, error, nonzero, size, table, shared_data):
    data = load(dataset, data_dir=shared_data / dataset)
    metrics = evaluate(ARTIFACTS / name, data.test, latency_runs=0)
    assert metrics.test_samples == 10_000
    assert round(100 * (1 - metrics.accuracy), 2) == pytest.approx(error, abs=1e-9)
    if nonzero is not None:
        assert metrics.nonzero_params == nonzero
    text = (ARTIFACTS.parent / "results" / table).read_text()
    if size is not None:
        assert metrics.file_bytes == (ARTIFACTS / name).stat().st_size == size
        assert f"{size:,} B" in text
    assert f"{error:.2f}" in text or f"{100 - error:.2f}" in text  # tables state error or accuracy
