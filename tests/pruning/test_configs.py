"""Pruning and schedule configs: YAML round trips and errors that name the value and the fix."""
from __future__ import annotations

import pytest
import yaml

from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.pruning import (
    GradientPruning,
    Gradual,
    Iterative,
    MagnitudePruning,
    OneShot,
    RandomPruning,
    TaylorPruning,
)


@pytest.mark.parametrize("config", [
    MagnitudePruning(sparsity=0.9, scope="local", groups={"re:hidden\\..*": 0.8}, overrides={"fc2": 0.5}, pattern="1x4"),
    MagnitudePruning(pattern="2:4", layers=("conv2",)),
    GradientPruning(sparsity=0.7, batches=3, batch_size=16, seed=2),
    TaylorPruning(sparsity=0.8, batches=8, pattern="4x4"),
    RandomPruning(sparsity=0.3, seed=7, scope="local"),
    OneShot(),
    Iterative(sparsities=(0.5, 0.75), epochs_per_step=2),
    Gradual(initial=0.1, start=2, steps=5, interval=3),
])
def test_configs_survive_a_yaml_round_trip(config):
    assert from_dict(type(config), yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


@pytest.mark.parametrize("build, message", [
    (lambda: MagnitudePruning(sparsity=1.0), r"^sparsity: 1\.0 is outside \[0, 1\); use e\.g\. 0\.9"),
    (lambda: MagnitudePruning(sparsity=-0.1), r"^sparsity: -0\.1 is outside \[0, 1\)"),
    (lambda: MagnitudePruning(groups={"re:hidden.*": 1.2}), r"^groups\.re:hidden\.\*: 1\.2 is outside \[0, 1\)"),
    (lambda: MagnitudePruning(pattern="5:4"), r"^pattern: 5:4 has N > M; N:M keeps the N highest of every M weights"),
    (lambda: MagnitudePruning(pattern="1:4"),
     r"^sparsity: 0\.5 does not match pattern 1:4, which prunes exactly 3 of every 4 weights; set sparsity: 0\.75$"),
    (lambda: MagnitudePruning(pattern="2:4", overrides={"fc1": 0.2}), r"^overrides: not supported with pattern 2:4"),
    (lambda: TaylorPruning(batches=0), r"^batches: 0 must be >= 1$"),
    (lambda: Iterative(sparsities=(0.75, 0.5)), r"^sparsities: \[0\.75, 0\.5\] must rise step by step"),
    (lambda: Gradual(steps=0), r"^steps: 0 must be >= 1$"),
])
def test_bad_configs_name_the_value_and_the_fix(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_unquoted_nm_pattern_in_yaml_gets_a_hint_with_its_path():
    raw = yaml.safe_load("sparsity: 0.5\npattern: 2:4\n")  # YAML 1.1: 2:4 is the base-60 number 124
    assert raw["pattern"] == 124
    with pytest.raises(ConfigError, match=r"^MagnitudePruning\.pattern: got the number 124: YAML reads an unquoted 2:4 .* quote it: pattern: '2:4'$"):
        from_dict(MagnitudePruning, raw)
    assert from_dict(MagnitudePruning, yaml.safe_load("pattern: '2:4'")).parsed_pattern.n == 2
