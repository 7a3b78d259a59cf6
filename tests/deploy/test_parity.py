"""The export gate: a file whose outputs are beyond tolerance fails with one line, or is kept and flagged."""
import json

import pytest
import torch
from torch import nn

from deepshrink.core.cpu import cpu_info
from deepshrink.deploy import export
from deepshrink.deploy.parity import TOLERANCES, ParityError, measure, measure_outputs
from deepshrink.formats.sidecar import read_sidecar


class ExportsDifferently(nn.Module):
    """Computes ``fc(x)`` eagerly but ``1.5 * fc(x)`` when captured by torch.export: a file that
    is deterministically wrong on every CPU, as a miscompiled or saturated file would be."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.fc(x)
        return 1.5 * y if torch.compiler.is_exporting() else y


def test_float_parity_tolerance_is_relative_to_the_output():
    ref = torch.tensor([[10.0, -2.0], [3.0, 1.0]])
    assert measure(ref, ref + 0.005, runtime="r", step=None, quantized=False).passed        # 0.005 <= 1e-3 * 11
    bad = measure(ref, ref + 0.02, runtime="r", step=None, quantized=False)
    assert not bad.passed and bad.failures == ("max |Δ| 0.02 > 0.011",)


def test_quantized_parity_counts_output_steps():
    ref = torch.zeros(100, 10)
    one_step = ref.clone()
    one_step[::10, 0] = 0.1                                   # 10 of 1,000 outputs one step off
    ok = measure(ref, one_step, runtime="r", step=0.1, quantized=True)
    assert ok.passed and ok.max_steps == pytest.approx(1.0) and ok.mean_steps == pytest.approx(0.01)
    far = measure(ref, ref + 0.5, runtime="r", step=0.1, quantized=True)
    assert [f.split(" >")[0] for f in far.failures] == ["p99 |Δ| 5.00 output steps", "mean |Δ| 5.00 output steps"]
    assert TOLERANCES["quantized"]["p99_steps"] == 3.0


def test_quantized_parity_gates_top1_agreement():
    # every output within one step, yet every near-tie answer flipped: the step figures pass, top-1 does not
    ref = torch.tensor([[0.1, 0.0]] * 50)
    flipped = torch.tensor([[0.0, 0.1]] * 50)
    bad = measure(ref, flipped, runtime="r", step=0.1, quantized=True)
    assert bad.p99_steps <= 3 and bad.mean_steps <= 1 and bad.argmax_agreement == 0.0
    assert bad.failures == ("argmax agreement 0.0% < 97%",)
    assert measure(ref, flipped, runtime="r", step=0.1, quantized=True, gate_argmax=False).passed


def test_top1_agreement_gates_a_classifier_but_not_hidden_states():
    """The argmax of a hidden-state vector flips on near-ties and means nothing: a transformer's
    [batch, seq, features] output is held to its range, a classifier's rows also to top-1 agreement."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.rand(4, 10, 64, generator=g)
    produced = hidden + 0.004 * torch.randn(hidden.shape, generator=g)
    as_states = measure_outputs([(hidden,)], [(produced,)], runtime="r", steps=[None], quantized=True)
    as_scores = measure_outputs([(hidden.reshape(40, 64),)], [(produced.reshape(40, 64),)], runtime="r", steps=[None],
                                quantized=True)
    assert as_states.argmax_agreement == as_scores.argmax_agreement < TOLERANCES["quantized-float-output"]["argmax_agreement"]
    assert as_states.passed and as_states.p99_range_fraction < 0.02            # within range: no top-1 gate
    assert not as_scores.passed and any(f.startswith("argmax agreement") for f in as_scores.failures)


@pytest.mark.parametrize("suffix", [".pte", ".onnx"])
def test_a_file_beyond_tolerance_fails_the_export_with_one_line(tmp_path, suffix):
    path = tmp_path / f"wrong{suffix}"
    with pytest.raises(ParityError) as caught:
        export(ExportsDifferently().eval(), path, example_input=torch.randn(8, 16))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: export parity check failed in ")
    assert "max |Δ|" in message and "tolerance for a float graph: max_abs_rel 0.001" in message
    assert cpu_info().model in message and "parity: warn" in message
    assert not path.exists()                      # a file known to be wrong is not left behind
    assert caught.value.parity.failures


def test_parity_warn_keeps_the_file_and_records_the_failure(tmp_path):
    path = tmp_path / "kept.onnx"
    result = export(ExportsDifferently().eval(), path, example_input=torch.randn(8, 16), parity="warn")
    assert path.is_file() and not result.parity_passed
    sidecar = read_sidecar(path)
    assert sidecar["parity_passed"] is False and sidecar["parity"][0]["runtime"] == "onnxruntime"
    assert sidecar["cpu"]["features"] == list(cpu_info().features)


def test_evaluate_prints_the_recorded_parity(tmp_path, capsys):
    from deepshrink.cli import main

    path = tmp_path / "kept.onnx"
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    export(model, path, example_input=torch.randn(8, 1, 8, 8))
    assert main(["evaluate", str(path), "--data", "digits", "--image-size", "8", "--runs", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "export parity   onnxruntime: max |Δ|" in out and "— ok" in out
    assert f"CPU             {cpu_info().describe()}" in out
    assert main(["evaluate", str(path), "--data", "digits", "--image-size", "8", "--runs", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parity"][0]["passed"] is True and doc["cpu"]["features"] == list(cpu_info().features)
