from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from deepshrink.core.config import check, from_dict, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.pruning import MagnitudePruning
from deepshrink.quantization import Int8Dynamic, Int8Static
from deepshrink.training import Distillation, TrainConfig


@dataclass(frozen=True)
class Inner:
    bits: int = 8

    def __post_init__(self):
        check(2 <= self.bits <= 8, "bits", f"{self.bits} is outside 2..8")


@dataclass(frozen=True)
class Outer:
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    names: tuple[str, ...] = ()
    table: dict[str, float] = field(default_factory=dict)
    maybe: Inner | None = None


@pytest.mark.parametrize("config", [
    MagnitudePruning(sparsity=0.9, scope="local", layers=("fc1", "re:hidden\\..*"), overrides={"fc2": 0.5}),
    TrainConfig(epochs=3, distill=Distillation(temperature=2.0, alpha=0.3)),
    Int8Static(calibration="minmax", calibration_samples=128, per_channel=False),
    Int8Dynamic(),
    Outer(mode="b", inner=Inner(4), names=("x",), table={"k": 1.5}, maybe=Inner(3)),
])
def test_configs_survive_a_yaml_round_trip(config):
    text = yaml.safe_dump(to_dict(config))
    assert from_dict(type(config), yaml.safe_load(text)) == config


@dataclass(frozen=True)
class Stages:
    steps: tuple[Inner, ...] = ()


def test_to_dict_is_plain_data_all_the_way_down():
    import json

    plain = to_dict(Stages(steps=(Inner(4), Inner(2))))
    assert plain == {"steps": [{"bits": 4}, {"bits": 2}]} and type(plain["steps"]) is list
    assert json.loads(json.dumps(plain)) == plain                       # what metrics.json stores
    assert to_dict(MagnitudePruning(layers=("fc1",)))["layers"] == ["fc1"]
    assert from_dict(Stages, plain) == Stages(steps=(Inner(4), Inner(2)))


def test_unknown_key_names_its_path_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"^Outer\.inner\.bitz: unknown key; allowed keys: bits; did you mean 'bits'\?$"):
        from_dict(Outer, {"inner": {"bitz": 3}})


def test_range_error_names_the_nested_field():
    with pytest.raises(ConfigError, match=r"^Outer\.inner\.bits: 9 is outside 2\.\.8$"):
        from_dict(Outer, {"inner": {"bits": 9}})


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"Outer\.mode: 'c' is not allowed; choose one of 'a', 'b'"):
        from_dict(Outer, {"mode": "c"})


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="expected an integer, got '8'"):
        from_dict(Inner, {"bits": "8"})
    with pytest.raises(ConfigError, match="expected an integer, got True"):
        from_dict(Inner, {"bits": True})
    with pytest.raises(ConfigError, match=r"Outer\.names: expected a list of str"):
        from_dict(Outer, {"names": "x"})


def test_sparsity_outside_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sparsity: 1\.0 is outside \[0, 1\)"):
        MagnitudePruning(sparsity=1.0)
