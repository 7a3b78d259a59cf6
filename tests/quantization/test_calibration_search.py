"""``Int8Static(calibration="auto")``: one calibration pass, every method's range measured by the
int8 model's output SQNR on the calibration samples, the best one used — and the model is then
bit for bit the one that method gives on its own; the fidelity figure takes outputs whose shapes
differ from batch to batch (token ids, audio frames of any length)."""
from __future__ import annotations

import math

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.quantization import Int8Static, quantize
from deepshrink.quantization.bias_correction import output_fidelity
from deepshrink.quantization.observers import METHODS
from deepshrink.quantization.pt2e import best_calibration

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_measures_every_method_and_gives_the_best_ones_model_exactly(mobile, mobile_data):
    auto = quantize(mobile, Int8Static(calibration="auto"), data=mobile_data)
    record = auto._deepshrink_quant
    search = record["calibration_search"]
    assert tuple(search) == METHODS
    assert all(math.isfinite(f["sqnr_db"]) and 0 <= f["agreement"] <= 1 for f in search.values())
    chosen = record["calibration"]
    assert chosen == max(search, key=lambda m: search[m]["sqnr_db"])
    # the choice matters on this net: the methods' SQNRs span more than 1 dB
    assert max(f["sqnr_db"] for f in search.values()) - min(f["sqnr_db"] for f in search.values()) > 1.0
    alone = quantize(mobile, Int8Static(calibration=chosen), data=mobile_data)
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(auto(x), alone(x))
    assert [r["scale"] for r in record["activation_ranges"]] == [r["scale"] for r in alone._deepshrink_quant["activation_ranges"]]


def test_ties_go_to_agreement_then_to_the_earlier_method():
    search = {m: {"sqnr_db": 30.0, "agreement": 0.9} for m in METHODS}
    assert best_calibration(search) == "minmax"
    search["mse"] = {"sqnr_db": 30.0, "agreement": 0.95}
    assert best_calibration(search) == "mse"
    search["entropy"] = {"sqnr_db": 30.5, "agreement": 0.5}
    assert best_calibration(search) == "entropy"


def test_percentile_is_allowed_with_auto_and_refused_where_it_does_nothing():
    assert Int8Static(calibration="auto", percentile=99.9).percentile == 99.9
    with pytest.raises(ConfigError, match="percentile: 99.9 has no effect with calibration='mse'"):
        Int8Static(calibration="mse", percentile=99.9)


def test_fidelity_takes_batches_of_different_lengths():
    g = torch.Generator().manual_seed(0)
    expected = [torch.randn(1, n, 8, generator=g) for n in (3, 7, 5)]
    noise = [0.01 * torch.randn(e.shape, generator=g) for e in expected]
    f = output_fidelity(expected, [e + d for e, d in zip(expected, noise)])
    signal = sum(float(e.double().pow(2).sum()) for e in expected)
    error = sum(float(d.double().pow(2).sum()) for d in noise)
    assert f["agreement"] is None
    assert f["sqnr_db"] == pytest.approx(10 * math.log10(signal / error), rel=1e-5)   # e + d rounds in float32
    # classifier scores in batches of 3 and 2: agreement over the 5 samples
    ref = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    out = [torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    assert output_fidelity(ref, out)["agreement"] == pytest.approx(4 / 5)
