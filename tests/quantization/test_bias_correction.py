"""Empirical bias correction: smaller mean output error, on data it did not see, and in the runtime."""
from __future__ import annotations

import pytest
import torch

from deepshrink.quantization import Int8Static, quantize


def _mean_shift(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Mean over output channels of |E[float - quantized]|: the bias the correction targets."""
    return float((reference - output).mean(dim=0).abs().mean())


@pytest.fixture(scope="module")
def pair(mobile, mobile_data):
    # per-tensor weights on a net whose depthwise channels span 100x: a visibly biased int8 model
    plain = quantize(mobile, Int8Static(per_channel=False), data=mobile_data)
    corrected = quantize(mobile, Int8Static(per_channel=False, bias_correction=True), data=mobile_data)
    return plain, corrected


def test_the_correction_removes_the_mean_error_on_calibration_data(pair):
    _, corrected = pair
    rows = corrected._deepshrink_quant["bias_correction"]
    assert [r["layer"] for r in rows] == ["stem.0", "dw.1", "pw.0", "fc"]
    for r in rows:
        assert r["mean_abs_shift_after"] <= 1e-5 + 1e-3 * r["mean_abs_shift_before"]


def test_the_mean_output_error_drops_on_held_out_data(mobile, mobile_data, pair):
    plain, corrected = pair
    x = torch.stack([mobile_data.test[i][0] for i in range(len(mobile_data.test))])
    with torch.no_grad():
        reference, before, after = mobile(x), plain(x), corrected(x)
    assert _mean_shift(reference, after) < 0.3 * _mean_shift(reference, before)


def test_the_correction_survives_export(mobile, mobile_data, pair, tmp_path):
    from deepshrink.deploy import export
    from deepshrink.evaluation.runners import open_runner

    plain, corrected = pair
    x = torch.stack([mobile_data.test[i][0] for i in range(len(mobile_data.test))])
    export(corrected, tmp_path / "corrected.onnx", example_input=x[:16])
    with torch.no_grad():
        reference, before = mobile(x), plain(x)
    runtime = open_runner(tmp_path / "corrected.onnx").predict(x)
    assert _mean_shift(reference, runtime) < 0.3 * _mean_shift(reference, before)
