"""Mixed precision by measured sensitivity (``Int8Static(mixed_precision=MixedPrecision(...))``):
on an MLP whose input has one outlier feature (its int8 grid leaves the other features a few codes),
the measurement names the first layer, the re-quantized model keeps it float and is more faithful
on held-out inputs, the measuring leaves the int8 graph exactly as it was, the byte budget and the
gain floor stop the search, and the mixed model exports to both runtimes within parity."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepshrink.core.config import from_dict
from deepshrink.core.errors import ConfigError
from deepshrink.data import from_datasets
from deepshrink.quantization import Int8Static, MixedPrecision, quantize
from deepshrink.quantization.bias_correction import calibration_batches
from deepshrink.quantization.mixed_precision import ANNOTATED, candidates, mixed_precision_line, run_in_float
from deepshrink.quantization.weight_range import float_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class OutlierInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _inputs(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 100.0   # one feature a hundred times the others: the int8 input grid is ~0.8 wide
    return x


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = OutlierInput()
    with torch.no_grad():
        m.fc1.weight[:, 0] *= 0.01   # ...yet the output depends on the small features
    return m.eval()


@pytest.fixture(scope="module")
def data(model):
    x = _inputs(512, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    return from_datasets(TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:]), num_classes=10, calib_size=128)


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    return 10 * math.log10(float(reference.double().pow(2).sum() / (reference.double() - output.double()).pow(2).sum()))


@pytest.fixture(scope="module")
def pair(model, data):
    return (quantize(model, Int8Static(), data=data),
            quantize(model, Int8Static(mixed_precision=MixedPrecision(max_layers=1, max_growth=1.0)), data=data))


def test_the_layer_whose_input_breaks_int8_is_kept_float_and_fidelity_rises_on_held_out_inputs(model, pair):
    plain, mixed = pair
    report = mixed._deepshrink_quant["mixed_precision"]
    assert report["chosen"] == ["fc1"] and report["kept"] is True
    assert mixed._deepshrink_quant["fp32_layers"] == ["fc1"]
    assert report["stopped"] == "max_layers reached"
    # the first round: fc1 alone gains more than 10 dB, fc3 under 1; fc2 (3,072 bytes more) is over the budget
    rows = {r["layer"]: r for r in report["steps"][0]}
    assert set(rows) == {"fc1", "fc2", "fc3"}
    assert rows["fc1"]["gain_db"] > 10 and rows["fc3"]["gain_db"] < 1
    assert rows["fc2"]["gain_db"] is None and rows["fc2"]["skipped"] == "over the byte budget"
    assert report["fidelity_after"]["sqnr_db"] > report["fidelity_before"]["sqnr_db"] + 10
    # the measurement predicts the re-quantized graph within 1 dB here (nothing else reads fc1's input)
    assert abs(report["fidelity_measured"]["sqnr_db"] - report["fidelity_after"]["sqnr_db"]) < 1.0
    held_out = _inputs(1000, seed=7)
    with torch.no_grad():
        ref, a, b = model(held_out), plain(held_out), mixed(held_out)
    assert _sqnr(ref, b) > _sqnr(ref, a) + 10
    # fc1's bytes: 16 x 32 weights at 3 bytes more each, within the budget (1.0 x the 1,856 int8 weight bytes)
    assert (report["extra_bytes"], report["int8_weight_bytes"], report["budget_bytes"]) == (1536, 1856, 1856)
    assert "fc1 float (1,536 bytes more), kept" in mixed_precision_line(report)


def test_measuring_a_layer_in_float_leaves_the_int8_graph_exactly_as_it_was(model, data, pair):
    plain, _ = pair
    from deepshrink.quantization.graph_passes import float_graph

    graph, _ = float_graph(model, data.example_input(), max_batch=64)
    weights = float_weights(graph)
    annotated = getattr(plain, ANNOTATED)   # what the quantizer annotated, kept on the converted graph
    pool = candidates(plain, weights, annotated)
    assert [c.layer for c in pool] == ["fc1", "fc2", "fc3"]
    x = torch.cat(calibration_batches(data, 128))
    code, before = plain.code, plain(x)
    with run_in_float(plain, pool[:2], weights, annotated) as trial:
        inside = trial(x)
    assert not torch.equal(inside, before)
    assert plain.code == code and torch.equal(plain(x), before)
    assert not any(name.startswith("_deepshrink_float_weight_") for name, _ in plain.named_buffers())


def test_the_byte_budget_and_the_gain_floor_stop_the_search(model, data, pair):
    plain, _ = pair
    x = _inputs(64, seed=3)
    poor = quantize(model, Int8Static(mixed_precision=MixedPrecision(max_growth=1e-3)), data=data)
    report = poor._deepshrink_quant["mixed_precision"]
    assert report["chosen"] == [] and report["kept"] is False
    assert report["stopped"] == "every remaining layer is over the byte budget"
    assert all(r["skipped"] == "over the byte budget" for r in report["steps"][0])
    demanding = quantize(model, Int8Static(mixed_precision=MixedPrecision(min_gain_db=1000, max_growth=1.0)), data=data)
    report = demanding._deepshrink_quant["mixed_precision"]
    assert report["chosen"] == [] and report["stopped"].startswith("no layer gains 1000 dB (best fc1: ")
    with torch.no_grad():   # nothing chosen: the plain int8 model, bit for bit
        assert torch.equal(poor(x), plain(x)) and torch.equal(demanding(x), plain(x))
    assert "no layer kept float" in mixed_precision_line(report)


def test_the_target_stops_as_soon_as_it_is_reached(model, data):
    q = quantize(model, Int8Static(mixed_precision=MixedPrecision(max_layers=3, max_growth=3.0, target_sqnr_db=20.0)), data=data)
    report = q._deepshrink_quant["mixed_precision"]
    assert report["chosen"] == ["fc1"] and report["stopped"] == "target 20 dB reached"


def test_bad_settings_name_the_field_and_a_recipe_spells_it_as_a_mapping():
    with pytest.raises(ConfigError, match="max_layers: 0 must be >= 1"):
        MixedPrecision(max_layers=0)
    with pytest.raises(ConfigError, match="max_growth: 0 must be > 0"):
        MixedPrecision(max_growth=0)
    config = from_dict(Int8Static, {"mixed_precision": {"max_layers": 2, "target_sqnr_db": 40}})
    assert config.mixed_precision == MixedPrecision(max_layers=2, target_sqnr_db=40.0)
    with pytest.raises(ConfigError, match="min_gain_db"):
        from_dict(Int8Static, {"mixed_precision": {"min_gain_db": -1}})


@pytest.mark.parametrize("target,suffix", [("xnnpack", ".pte"), ("onnxruntime", ".onnx")])
def test_the_mixed_model_exports_within_parity(model, data, tmp_path, target, suffix):
    from deepshrink.deploy import export

    q = quantize(model, Int8Static(mixed_precision=MixedPrecision(max_layers=1, max_growth=1.0)), data=data, target=target)
    assert q._deepshrink_quant["mixed_precision"]["chosen"] == ["fc1"]
    result = export(q, tmp_path / f"mixed{suffix}", example_input=data.example_input(8), target=target)
    assert result.parity_passed


class ResidualNorm(nn.Module):
    """A transformer block's residual stream: linear -> add(residual) -> LayerNorm -> linear. The
    stream carries one feature 50x the others, so its int8 grid (the add's output) is coarse for the
    rest, which the LayerNorm then rescales: that rounding, not any weight, is the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.fc(x)))


def test_the_int8_output_a_layernorm_reads_is_a_candidate_and_costs_no_bytes(tmp_path):
    from deepshrink.deploy import export

    torch.manual_seed(0)
    model = ResidualNorm().eval()
    x = _inputs(512, seed=2)
    x[:, 0] *= 0.5   # the outlier feature: 50x the others
    data = from_datasets(TensorDataset(x[:256], torch.zeros(256, dtype=torch.long)),
                         TensorDataset(x[256:], torch.zeros(256, dtype=torch.long)), num_classes=8, calib_size=128)
    q = quantize(model, Int8Static(mixed_precision=MixedPrecision(max_layers=1)), data=data, target="onnxruntime")
    record = q._deepshrink_quant
    report = record["mixed_precision"]
    rows = {r["layer"]: r for r in report["steps"][0]}
    outputs = [name for name in rows if name.endswith(" output)")]
    assert len(outputs) == 1 and rows[outputs[0]]["extra_bytes"] == 0   # the add, read by the LayerNorm
    assert report["chosen"] == outputs and report["kept"] is True and report["extra_bytes"] == 0
    assert record["fp32_nodes"] == report["chosen_nodes"] == [outputs[0].split("(")[1].split()[0]]
    assert report["fidelity_after"]["sqnr_db"] > report["fidelity_before"]["sqnr_db"] + 3
    # the measured gain is what the re-quantized graph gives (within 0.5 dB)
    assert abs(report["fidelity_measured"]["sqnr_db"] - report["fidelity_after"]["sqnr_db"]) < 0.5
    result = export(q, tmp_path / "residual.onnx", example_input=data.example_input(8), target="onnxruntime")
    assert result.parity_passed


def test_two_float_layers_in_a_row_are_measured_as_the_requantized_graph_computes_them(model, data):
    """The second pick reads the first's output: float in the re-quantized graph (the first layer's
    int8 output went with it), so the measurement must not round it either."""
    q = quantize(model, Int8Static(mixed_precision=MixedPrecision(max_layers=2, max_growth=3.0, min_gain_db=0.0)), data=data)
    report = q._deepshrink_quant["mixed_precision"]
    assert report["chosen"][0] == "fc1" and len(report["chosen"]) == 2
    assert abs(report["fidelity_measured"]["sqnr_db"] - report["fidelity_after"]["sqnr_db"]) < 0.1


def test_the_report_tabulates_every_round_and_says_what_was_kept(pair):
    from deepshrink.report.html import render_report

    _, mixed = pair
    report = mixed._deepshrink_quant["mixed_precision"]
    stage = {"index": 0, "stage": {"quantize": {}}, "seconds": 1.0, "summary": {"line": "x", "mixed_precision": report}}
    html = render_report({"variants": {}, "shipped": None, "stages": [stage]}, title="t")
    assert "Mixed precision by measured sensitivity: fc1 in float — kept: output SQNR" in html
    assert "round 1: layer" in html and "over the byte budget" in html
    row = html[html.index("<td>fc1</td>"):].split("</tr>")[0]
    assert "float" in row and f"{report['steps'][0][0]['gain_db']:.4g}" in row


def test_a_float_last_layer_also_returns_its_output_unrounded(model, data):
    """The model's output is a float reader too: with fc3 float the re-quantized graph returns fc3's
    float output, and the measurement must see that (it once kept the output's int8 rounding)."""
    from deepshrink.quantization.mixed_precision import fidelity_of

    # a budget of 1,000 bytes: only fc3 (960 more) is measured, fc1 (1,536) and fc2 (3,072) are over it
    q = quantize(model, Int8Static(mixed_precision=MixedPrecision(max_layers=1, max_growth=1000 / 1856)), data=data)
    row = next(r for r in q._deepshrink_quant["mixed_precision"]["steps"][0] if r["layer"] == "fc3")
    real = quantize(model, Int8Static(fp32_layers=("fc3",)), data=data)
    batches = calibration_batches(data, 128)
    with torch.no_grad():
        expected = [model(x) for x in batches]
    assert row["sqnr_db"] == pytest.approx(fidelity_of(real, batches, expected)["sqnr_db"], abs=1e-9)
