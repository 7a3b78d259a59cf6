"""Configs survive a YAML round trip; bad values fail with messages that name the field and the fix."""
from __future__ import annotations

import pytest
import yaml

from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.quantization.lowbit import Codebook, WeightOnly, WeightQAT, quantize_weights_
from deepshrink.quantization.lowbit.codebook import codebook_quantize_
from deepshrink.quantization.lowbit.qat import prepare_qat
from deepshrink.training import Distillation, TrainConfig

from .conftest import new_mlp


@pytest.mark.parametrize("config", [
    WeightOnly(bits=3, symmetric=False, granularity="per_group", group_size=8, layers={"re:.*classifier": 8, "*": 4}),
    WeightOnly(layers={"hidden.0": None}),
    WeightQAT(bits=2, method="ste", granularity="per_tensor", train=TrainConfig(epochs=1, lr=1e-3, distill=Distillation())),
    Codebook(method="equal_population", bits=5, layers={"classifier": None}, kmeans_init="density",
             train=TrainConfig(epochs=2, lr=1e-4)),
])
def test_configs_survive_a_yaml_round_trip(config):
    assert from_dict(type(config), yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


@pytest.mark.parametrize("make,field,fragment", [
    (lambda: WeightOnly(bits=1), "bits", "outside 2..8"),
    (lambda: WeightOnly(bits=9), "bits", "outside 2..8"),
    (lambda: WeightOnly(layers={"fc1": 12}), "layers.fc1", "outside 2..8"),
    (lambda: Codebook(bits=16), "bits", "outside 2..8"),
    (lambda: WeightQAT(bits=0), "bits", "outside 2..8"),
    (lambda: WeightOnly(granularity="per_group"), "group_size", "positive integer with granularity per_group"),
    (lambda: WeightOnly(group_size=32), "group_size", "only used with granularity per_group"),
    (lambda: WeightQAT(method="lsq", symmetric=False), "symmetric", "use method ste"),
    (lambda: WeightQAT(method="lsq", granularity="per_group", group_size=4), "granularity", "use method ste"),
    (lambda: Codebook(method="power_of_two", train=TrainConfig(epochs=1, lr=1e-4)), "train", "off the powers of two"),
])
def test_bad_values_raise_config_error_naming_the_field(make, field, fragment):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(f"{field}: ") and fragment in str(err.value)


def test_from_dict_reports_the_path_of_a_bad_width():
    with pytest.raises(ConfigError, match=r"^WeightOnly\.bits: 1 is outside 2\.\.8"):
        from_dict(WeightOnly, {"bits": 1})


@pytest.mark.parametrize("apply", [
    lambda m: quantize_weights_(m, WeightOnly(layers={"re:.*fc9": 8})),
    lambda m: codebook_quantize_(m, Codebook(layers={"fc9": 2})),
    lambda m: prepare_qat(m, WeightQAT(layers={"re:fc9": 2})),
])
def test_a_layer_pattern_matching_nothing_is_an_error_listing_the_layers(apply):
    with pytest.raises(ConfigError, match="fc9.* matches no layer; layers are: hidden.0, hidden.1, classifier"):
        apply(new_mlp())


def test_an_invalid_regex_is_an_error():
    with pytest.raises(ConfigError, match="not a valid regex"):
        quantize_weights_(new_mlp(), WeightOnly(layers={"re:hidden.(": 8}))


def test_a_group_size_not_dividing_a_row_names_the_layer_and_leaves_the_model_untouched():
    model = new_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # rows are 8 (hidden.0) and 16 (hidden.1, classifier) long: 16 divides only the last two
    with pytest.raises(ConfigError) as err:
        quantize_weights_(model, WeightOnly(granularity="per_group", group_size=16))
    message = str(err.value)
    assert "layer hidden.0 (weight [16, 8])" in message and "does not divide the row length 8" in message
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
