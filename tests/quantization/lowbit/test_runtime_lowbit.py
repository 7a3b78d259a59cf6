"""Int8DynamicLowBit: Linear weights that the .pte itself stores and runs at 4 or 8 bits.

A LeNet-300-100 trained for one epoch on digits, exported once per scheme (module fixtures): the
file is as small as its codes say, every linear runs inside the XNNPACK delegate, and the file
computes what the quantized module computes.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import deepshrink
from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError, ExportError
from deepshrink.deploy import export
from deepshrink.evaluation.runners import open_runner
from deepshrink.quantization import quantize_report
from deepshrink.quantization.lowbit import DynamicQuantLinear, Int8DynamicLowBit
from deepshrink.quantization.lowbit.runtime import fit_runtime_weight, int8_per_row_round_trip

from .conftest import new_mlp, small_lenet

SHAPES = {"hidden.0": (300, 784), "hidden.1": (100, 300), "classifier": (10, 100)}   # lenet-300-100
MIXED = {"hidden.0": 4, "hidden.1": 8, "classifier": None}


def pte_bound(widths: dict[str, int | None], group: int = 32, overhead: int = 16_384) -> int:
    """Bytes a .pte may take: per layer its codes (4-bit rows padded to the group), its scales
    (bf16 per group at 4 bits, fp32 per channel at 8), fp32 weights for a float layer, fp32 biases;
    plus a fixed allowance for the program and the delegate's headers."""
    total = overhead
    for name, (out, inp) in SHAPES.items():
        bits = widths.get(name)
        if bits == 4:
            padded = math.ceil(inp / group) * group
            total += out * padded // 2 + out * (padded // group) * 2
        elif bits == 8:
            total += out * inp + out * 4
        else:
            total += out * inp * 4
        total += out * 4
    return total




SCHEMES = {"q4": Int8DynamicLowBit(bits=4, group_size=32), "q8": Int8DynamicLowBit(bits=8),
           "mixed": Int8DynamicLowBit(bits=4, layers=MIXED)}
FP32_BYTES = 4 * sum(o * i + o for o, i in SHAPES.values())   # a fp32 .pte holds at least its weights and biases


class Exports:
    """Each scheme quantized and exported once, on first use: ``(module, ExportResult, sidecar)``."""

    def __init__(self, trained, batch, directory) -> None:
        self.trained, self.batch, self.directory, self.done = trained, batch, directory, {}

    def __getitem__(self, scheme: str):
        if scheme not in self.done:
            model = deepshrink.quantize(copy.deepcopy(self.trained), SCHEMES[scheme], data=None)
            path = self.directory / f"{scheme}.pte"
            result = export(model, path, example_input=self.batch[:64])
            self.done[scheme] = (model, result, json.loads(path.with_name(path.name + ".json").read_text()))
        return self.done[scheme]


@pytest.fixture(scope="module")
def exported(trained, batch, tmp_path_factory):
    return Exports(trained, batch, tmp_path_factory.mktemp("lowbit"))


def test_configs_survive_a_yaml_round_trip():
    for config in (Int8DynamicLowBit(), Int8DynamicLowBit(bits=8, group_size=None, layers={"re:.*fc2": 4, "fc3": None})):
        assert from_dict(Int8DynamicLowBit, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


def test_a_recipe_stage_names_the_scheme_and_its_bad_keys():
    from deepshrink.pipeline.recipe import parse_stage

    stage = parse_stage({"quantize": {"scheme": "int8-dynamic-lowbit", "layers": {"fc2": 8, "*": 4}}}, "stages[0]")
    assert stage.config == Int8DynamicLowBit(layers={"fc2": 8, "*": 4})
    assert stage.as_dict()["quantize"]["scheme"] == "int8-dynamic-lowbit"
    with pytest.raises(ConfigError, match=r"stages\[0\]\.quantize\.group_size: 40 must be a positive multiple of 32"):
        parse_stage({"quantize": {"scheme": "int8-dynamic-lowbit", "group_size": 40}}, "stages[0]")


@pytest.mark.parametrize("make,key,fragment", [
    (lambda: Int8DynamicLowBit(bits=3), "bits", "use 4 or 8"),
    (lambda: Int8DynamicLowBit(bits=True), "bits", "use 4 or 8"),
    (lambda: Int8DynamicLowBit(layers={"fc2": 6}), "layers.fc2", "use 4 or 8"),
    (lambda: Int8DynamicLowBit(group_size=48), "group_size", "multiple of 32"),
    (lambda: Int8DynamicLowBit(group_size=0), "group_size", "multiple of 32"),
])
def test_bad_values_raise_config_error_naming_the_key(make, key, fragment):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(f"{key}: ") and fragment in str(err.value)


def test_patterns_select_linear_layers_only():
    with pytest.raises(ConfigError, match="'conv1' matches no layer.*Linear layers only; Conv layers stay float"):
        deepshrink.quantize(small_lenet(), Int8DynamicLowBit(layers={"conv1": 4}), data=None)
    model = deepshrink.quantize(small_lenet(), Int8DynamicLowBit(group_size=None), data=None)
    assert type(model.conv1) is nn.Conv2d and isinstance(model.fc1, DynamicQuantLinear)


def test_codes_are_4_bit_with_bf16_scales_and_padding_is_exact():
    torch.manual_seed(0)
    linear = nn.Linear(100, 12)
    with torch.no_grad():
        linear.weight[0, :50] = 0.0                      # pruned weights stay exactly zero
    w = fit_runtime_weight(linear.weight, bits=4, group_size=32, layer="fc")
    assert w.q.shape == (12, 128) and w.scale.shape == (12, 4) and w.group == 32
    assert int(w.q.min()) >= -8 and int(w.q.max()) <= 7 and bool((w.q[:, 100:] == 0).all())
    assert torch.equal(w.scale, w.scale.to(torch.bfloat16).float())
    layer = DynamicQuantLinear(w, linear.bias, in_features=100)
    assert bool((layer.dequantized_weight()[0, :50] == 0).all())
    err = (layer.dequantized_weight() - linear.weight).abs().max()
    assert err <= 0.51 * float(w.scale.max()) * 1.01  # half a step (a bf16-rounded scale may clip by a hair)
    x = torch.randn(16, 100)
    # the zero columns change neither the product nor the rows' int8 ranges (they contain 0)
    expected = F.linear(int8_per_row_round_trip(x), layer.dequantized_weight(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_all_4_bit_pte_is_small_and_fully_delegated(exported):
    _, q4, side = exported["q4"]
    assert q4.file_bytes < pte_bound({name: 4 for name in SHAPES})
    assert q4.file_bytes < 0.2 * FP32_BYTES
    assert side["delegation"] == {"delegate_calls": 1, "outside_delegate": {}}
    assert {n: (s["bits"], s["group_size"], s["kernel"]) for n, s in side["runtime_weights"].items()} == {
        n: (4, 32, "qd8-f32-qb4w") for n in SHAPES}
    assert side["runtime_weights"]["hidden.0"]["padded_in_features"] == 800


def test_8_bit_pte_stores_one_byte_per_weight(exported):
    _, q8, side = exported["q8"]
    assert q8.file_bytes < pte_bound({name: 8 for name in SHAPES})
    assert q8.file_bytes < 0.3 * FP32_BYTES
    assert side["delegation"]["outside_delegate"] == {}
    assert {s["kernel"] for s in side["runtime_weights"].values()} == {"qd8-f32-qc8w"}


def test_mixed_widths_map_to_their_kernels_and_size_between(exported):
    model, mixed, side = exported["mixed"]
    assert exported["q4"][1].file_bytes < mixed.file_bytes < exported["q8"][1].file_bytes + 4 * 10 * 100
    assert mixed.file_bytes < pte_bound(MIXED)
    assert type(model.classifier) is nn.Linear and side["delegation"]["outside_delegate"] == {}
    assert {n: (s["bits"], s["group_size"]) for n, s in side["runtime_weights"].items()} == {
        "hidden.0": (4, 32), "hidden.1": (8, None)}
    assert quantize_report(model)["runtime_weights"] == side["runtime_weights"]


@pytest.mark.parametrize("scheme", ["q4", "q8", "mixed"])
def test_pte_computes_what_the_module_computes(exported, trained, batch, scheme):
    model, result, side = exported[scheme]
    assert result.parity_passed and side["parity"][0]["kind"] == "quantized-float-output"
    with torch.no_grad():
        reference, float_logits = model(batch), trained(batch)
    produced = open_runner(result.path, threads=1).predict(batch)
    span = float(reference.max() - reference.min())
    # stated tolerance: 1 % of the output range (measured: <= 0.1 %; the runtime rounds a few
    # activations to the neighbouring int8 code); top-1 as the module's, and mostly as the float model's
    assert float((produced - reference).abs().max()) <= 0.01 * span
    assert float((produced.argmax(1) == reference.argmax(1)).float().mean()) >= 0.99
    assert float((produced.argmax(1) == float_logits.argmax(1)).float().mean()) >= 0.9


def test_onnx_export_runs_the_same_module_and_dsk_says_how(trained, batch, tmp_path):
    model = deepshrink.quantize(copy.deepcopy(trained), Int8DynamicLowBit(), data=None)
    result = export(model, tmp_path / "q4.onnx", example_input=batch[:64])
    assert result.parity_passed
    assert result.file_bytes < 0.45 * 4 * sum(o * i for o, i in SHAPES.values())   # int8 codes, not fp32
    with pytest.raises(ExportError, match="export .pte"):
        export(model, tmp_path / "q4.dsk", example_input=batch[:64])


def test_small_mlp_quantizes_every_linear(blobs):
    model = deepshrink.quantize(new_mlp(), Int8DynamicLowBit(layers={"classifier": 8}), data=None)
    assert [type(m).__name__ for m in (model.hidden[0], model.hidden[1], model.classifier)] == ["DynamicQuantLinear"] * 3
    assert (model.hidden[0].bits, model.classifier.bits) == (4, 8)


def _recorded_then_runtime(model, config, runtime):
    recorded = deepshrink.quantize(copy.deepcopy(model), config, data=None)
    from deepshrink.quantization.lowbit.weights import quantized_weights

    records = dict(quantized_weights(recorded))
    return recorded, records, deepshrink.quantize(copy.deepcopy(recorded), runtime, data=None)


def test_a_uniform_grid_reaches_the_runtime_file_as_recorded_not_refit():
    """WeightOnly / WeightQAT codes and scales become the runtime's (a refit would move a trained grid:
    ``_recorded_affine``): 8-bit per channel exactly, 4-bit per channel with the scales in bfloat16
    and the rows padded to 32; a layer trained after its record is refit."""
    from deepshrink.quantization import WeightOnly
    from deepshrink.quantization.lowbit.weights import AffineWeight, set_quantized

    torch.manual_seed(0)
    model = new_mlp()
    _, records, runtime = _recorded_then_runtime(model, WeightOnly(bits=8, granularity="per_channel"), Int8DynamicLowBit(bits=8))
    layer = runtime.hidden[0]
    assert torch.equal(layer.qdata, records["hidden.0.weight"].q.to(torch.int8))
    assert torch.equal(layer.dequantized_weight(), records["hidden.0.weight"].dequantize())
    # a 4-bit grid as LSQ leaves one: steps twice min/max's, so no code passes +-4 (a refit would use +-7)
    recorded, records, _ = _recorded_then_runtime(model, WeightOnly(bits=4, granularity="per_channel"), Int8DynamicLowBit(bits=4))
    base = records["hidden.0.weight"]
    wide = AffineWeight(4, True, "per_channel", None, torch.round(base.q / 2).clamp(-4, 4), base.scale * 2, base.zero_point)
    with torch.no_grad():
        recorded.hidden[0].weight.copy_(wide.dequantize())
    set_quantized(recorded, "hidden.0.weight", recorded.hidden[0].weight, wide)
    runtime = deepshrink.quantize(copy.deepcopy(recorded), Int8DynamicLowBit(bits=4, group_size=None), data=None)
    layer = runtime.hidden[0]
    assert layer.padded_in_features == 32 and int(layer.qdata.abs().max()) == 4
    assert torch.equal(layer.qdata[:, :8], wide.q.to(torch.int8)) and not layer.qdata[:, 8:].any()
    torch.testing.assert_close(layer.scale, wide.scale.reshape(-1, 1).to(torch.bfloat16).float(), rtol=0, atol=0)
    torch.testing.assert_close(layer.dequantized_weight(), wide.dequantize(), rtol=2 ** -8, atol=0)
    assert int(fit_runtime_weight(wide.dequantize(), bits=4, group_size=None).q.abs().max()) == 7   # what a refit gives
    # trained after the record: the codes no longer describe the weight, so the runtime refits min/max
    with torch.no_grad():
        recorded.hidden[0].weight.add_(1e-3)
    moved = deepshrink.quantize(copy.deepcopy(recorded), Int8DynamicLowBit(bits=4, group_size=None), data=None)
    expected = fit_runtime_weight(recorded.hidden[0].weight, bits=4, group_size=None)
    assert torch.equal(moved.hidden[0].qdata, expected.q) and torch.equal(moved.hidden[0].scale, expected.scale)
