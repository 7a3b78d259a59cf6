"""The per-layer SQNR report points at the layer that breaks; the budget search leaves it in fp32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.quantization import Int8QAT, Int8Static, layer_sqnr_report, quantize, quantize_within_budget
from deepshrink.quantization.report import format_report
from deepshrink.training import TrainConfig, accuracy, fit

from .conftest import labelled_by


class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def broken_model() -> nn.Module:
    """fc2 reads a dead input (fc1's unit 5 never fires) through weights ~300x its others: the float
    function ignores them, but with one scale per tensor every other weight of fc2 rounds to 0 or +-1 code."""
    torch.manual_seed(0)
    model = ThreeLayers().eval()
    with torch.no_grad():
        model.fc1.bias[5] = -1000.0
        model.fc2.weight[:, 5] = 30.0
    return model


@pytest.fixture(scope="module")
def setup():
    model = broken_model()
    return model, labelled_by(model, n=512, shape=(1, 4, 8))


PER_TENSOR = Int8Static(per_channel=False, calibration="minmax")


def test_the_report_points_at_the_broken_layer(setup):
    model, data = setup
    rows = layer_sqnr_report(model, quantize(model, PER_TENSOR, data=data), data, samples=128)
    by_layer = {r.layer: r for r in rows}
    assert list(by_layer) == ["fc1", "fc2", "fc3"]
    assert by_layer["fc2"].layer_sqnr_db < 10
    assert by_layer["fc1"].layer_sqnr_db > 35 and by_layer["fc3"].layer_sqnr_db > 35
    assert by_layer["fc2"].output_sqnr_db < by_layer["fc2"].input_sqnr_db - 25   # the signal is lost here
    assert "fc2" in [line for line in format_report(rows).splitlines() if "<- worst" in line][0]


def test_an_input_channel_outlier_needs_equalization_not_per_channel_scales(setup):
    model, data = setup
    alone = {}
    for equalization in ("none", "cle"):
        q = quantize(model, Int8Static(equalization=equalization), data=data)
        alone[equalization] = {r.layer: r.layer_sqnr_db for r in layer_sqnr_report(model, q, data, samples=128)}
    # one scale per *output* channel cannot help: every row holds the outlier column
    assert alone["none"]["fc2"] < 5
    # CLE moves the outlier's magnitude into fc1's dead unit (float function unchanged)
    assert alone["cle"]["fc2"] > 20 and alone["cle"]["fc3"] > 35


def test_the_budget_search_falls_back_to_fp32_for_the_broken_layer(setup, caplog):
    model, data = setup
    with caplog.at_level("INFO", logger="deepshrink.quantization.budget"):
        quantized, report = quantize_within_budget(model, data, max_drop_pt=2.0, ptq=PER_TENSOR, train_fn=fit, accuracy_fn=accuracy)
    # each attempt is logged as it finishes, not only in the report at the end
    logged = [r.getMessage() for r in caplog.records if r.name == "deepshrink.quantization.budget"]
    assert [m.split(" ->")[0] for m in logged] == ["budget: ptq", "budget: fp32 fallback"]
    assert logged[1].endswith("of 2.00 allowed); fp32: fc2")
    assert report.float_accuracy == 1.0
    assert [s.action for s in report.steps] == ["ptq", "fp32 fallback"] and report.met
    assert report.steps[0].drop_pt > 20 and report.final.fp32_layers == ("fc2",) and report.final.drop_pt <= 2.0
    assert quantized._deepshrink_quant["fp32_layers"] == ["fc2"]


def test_the_budget_search_ends_with_qat_when_fallback_is_not_allowed(setup):
    model, data = setup
    _, report = quantize_within_budget(model, data, max_drop_pt=0.0, ptq=PER_TENSOR, max_fp32_layers=0,
                                       qat=Int8QAT(train=TrainConfig(epochs=1, lr=1e-4), per_channel=True),
                                       train_fn=fit, accuracy_fn=accuracy)
    assert [s.action for s in report.steps] == ["ptq", "qat"]
    assert report.steps[1].accuracy > report.steps[0].accuracy
    assert report.met == (report.final.drop_pt <= 0.0)


def test_in_place_activations_do_not_corrupt_the_recorded_outputs():
    from .conftest import make_mobile

    model = make_mobile(act=lambda: nn.ReLU6(inplace=True))   # hardtanh_ rewrites the conv output it reads
    data = labelled_by(model, n=128)
    rows = layer_sqnr_report(model, quantize(model, Int8Static(), data=data), data, samples=64)
    # the stem sees the model input, so "alone" and "in the model" are the same measurement
    assert rows[0].layer == "stem.0" and rows[0].layer_sqnr_db == pytest.approx(rows[0].output_sqnr_db, abs=1e-6)
    assert min(r.layer_sqnr_db for r in rows) > 30
