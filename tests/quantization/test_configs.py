"""Quantization configs: YAML round trips and ConfigErrors that name the field, the value and the fix."""
from __future__ import annotations

import pytest
import yaml

from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.quantization import Int8Dynamic, Int8QAT, Int8Static
from deepshrink.training import TrainConfig


@pytest.mark.parametrize("config", [
    Int8Static(calibration="percentile", percentile=99.9, calibration_samples=64, per_channel=True,
               bias_correction=True, equalization="cle_relu6_as_relu", fp32_layers=("fc", "re:stem\\..*")),
    Int8Static(calibration="entropy"),
    Int8Dynamic(per_channel=True, fp32_layers=("fc",)),
    Int8QAT(train=TrainConfig(epochs=2, lr=5e-4, optimizer="sgd", batch_size=32, lr_schedule="constant", seed=3), per_channel=False),
])
def test_configs_survive_a_yaml_round_trip(config):
    assert from_dict(type(config), yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


@pytest.mark.parametrize("build, message", [
    (lambda: Int8Static(calibration="percentile", percentile=40.0), r"^percentile: 40\.0 is outside \(50, 100\]; it is the share of values kept"),
    (lambda: Int8Static(percentile=99.9), r"^percentile: 99\.9 has no effect with calibration='histogram'; set calibration='percentile'"),
    (lambda: Int8Static(calibration_samples=0), r"^calibration_samples: 0 must be >= 1"),
    (lambda: Int8QAT(train=TrainConfig(epochs=0)), r"^train\.epochs: 0 must be >= 1; use Int8Static for no training"),
    (lambda: from_dict(Int8QAT, {"train": {"lr": 0.0}}), r"^Int8QAT\.train\.lr: 0\.0 must be > 0"),
    (lambda: from_dict(Int8QAT, {"epochs": 2}), r"^Int8QAT\.epochs: moved to train\.epochs; write train: \{epochs: 2, lr: 0\.0001\}"),
    (lambda: from_dict(Int8Static, {"calibration": "kl"}), r"^Int8Static\.calibration: 'kl' is not allowed; choose one of 'minmax', 'histogram', 'percentile', 'mse', 'entropy'"),
    (lambda: from_dict(Int8Static, {"equalization": "yes"}), r"^Int8Static\.equalization: 'yes' is not allowed; choose one of 'none', 'cle', 'cle_relu6_as_relu'"),
    (lambda: from_dict(Int8QAT, {"epoch": 2}), r"^Int8QAT\.epoch: unknown key; allowed keys: train, per_channel"),
])
def test_bad_configs_raise_clear_errors(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_budget_rejects_a_negative_budget(mobile, mobile_data):
    from deepshrink.quantization import quantize_within_budget

    with pytest.raises(ConfigError, match=r"max_drop_pt: -1 must be >= 0 \(percentage points of accuracy\)"):
        quantize_within_budget(mobile, mobile_data, max_drop_pt=-1)


def test_sqnr_report_needs_a_quantized_graph(mobile, mobile_data):
    from deepshrink.quantization import layer_sqnr_report

    with pytest.raises(ConfigError, match="quantized_model must be the graph returned by deepshrink.quantize"):
        layer_sqnr_report(mobile, mobile, mobile_data)
