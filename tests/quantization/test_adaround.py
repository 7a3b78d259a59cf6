"""AdaRound: learned up-or-down rounding of the int8 weight codes, on a small depthwise ReLU6 net
(seeded, see conftest): codes move by at most one step on an unchanged grid, every layer's
reconstruction error falls or stays, the guard's decision is recorded and can undo it, the output
SQNR rises, and the re-rounded codes reach the .pte and the .onnx."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.quantization import Int8Static, quantize
from deepshrink.quantization.adaround import (
    _weight_codes, adaround, beta_at, initial_logits, learn_rounding, rectified_sigmoid, rounding_penalty,
)
from deepshrink.quantization.bias_correction import calibration_batches, no_worse
from deepshrink.quantization.graph_passes import float_graph, get_attr_tensor, weighted_nodes


def _codes(q) -> dict[str, torch.Tensor]:
    return {n.name: get_attr_tensor(q, _weight_codes(n)).clone() for n in weighted_nodes(q)}


def _scales(q) -> dict[str, torch.Tensor]:
    return {n.name: get_attr_tensor(q, n.args[1].args[1]).clone() for n in weighted_nodes(q)}


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    return 10 * math.log10(float(reference.double().pow(2).sum() / (reference.double() - output.double()).pow(2).sum()))


pytestmark = pytest.mark.usefixtures("one_thread")   # the rounding's many small steps only contend for more


@pytest.fixture(scope="module")
def pair(mobile, mobile_data):
    return quantize(mobile, Int8Static(), data=mobile_data), quantize(mobile, Int8Static(rounding="adaround"), data=mobile_data)


def test_the_relaxation_starts_at_the_fractional_part_and_the_penalty_anneals():
    fraction = torch.linspace(0, 0.999, 1000)
    torch.testing.assert_close(rectified_sigmoid(initial_logits(fraction)), fraction, rtol=0, atol=1e-6)
    assert float(rounding_penalty(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_penalty(torch.tensor([0.5]), 20.0)) == 1.0
    # 20 % warm-up without the penalty, then beta 20 -> 2 linearly
    assert [beta_at(s, 100) for s in (0, 19)] == [None, None]
    assert (beta_at(20, 100), beta_at(99, 100)) == (20.0, 2.0)


def test_learned_rounding_beats_nearest_on_a_linear_layer():
    """Correlated inputs (with uncorrelated ones nearest rounding is optimal for a linear layer):
    the learned codes stay within floor..floor+1 and reconstruct the float output better, whatever
    the scale of the activations."""
    for size in (1.0, 0.01):
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(32, 64, generator=g)
        x = size * torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
        scale = weight.abs().amax(1, keepdim=True) / 7          # a coarse 4-bit grid: rounding matters
        target = x @ weight.T
        codes = learn_rounding(weight, scale, torch.zeros(()), -7, 7, lambda a, w: a @ w.T, x, target,
                               activation=lambda y: y, seed=0)
        floor = torch.floor(weight / scale)
        nearest = torch.clamp(torch.round(weight / scale), -7, 7)
        assert bool(((codes == floor) | (codes == floor + 1)).all()) and int((codes != nearest).sum()) > 100
        error = lambda c: float(((x @ (c * scale).T - target) ** 2).mean())  # noqa: E731
        assert error(codes) < 0.6 * error(nearest), size    # measured: 0.46 and 0.47


def test_codes_move_by_at_most_one_step_on_the_observers_grid(pair):
    nearest, rounded = pair
    before, after = _codes(nearest), _codes(rounded)
    assert list(before) == list(after) and len(before) == 4
    assert all(t.dtype == torch.int8 for t in after.values())
    for name in before:
        assert int((after[name].int() - before[name].int()).abs().max()) <= 1, name
    assert sum(int((after[n] != before[n]).sum()) for n in before) > 0
    for name, scale in _scales(nearest).items():   # the grid is the weight observer's, unchanged
        assert torch.equal(scale, _scales(rounded)[name])


def test_each_layer_reconstructs_no_worse_and_the_record_says_what_changed(pair):
    nearest, rounded = pair
    record = rounded._deepshrink_quant["adaround"]
    rows = record["layers"]
    assert [r["layer"] for r in rows] == ["stem.0", "dw.1", "pw.0", "fc"]
    assert all(r["error_after"] <= r["error_before"] for r in rows)
    assert sum(r["error_after"] < 0.95 * r["error_before"] for r in rows) >= 2
    assert record["kept"] and record["seconds"] > 0 and record["iterations"] == 400
    before, after = _codes(nearest), _codes(rounded)
    assert [r["changed_codes"] for r in rows] == [int((after[r["node"]] != before[r["node"]]).sum()) for r in rows]
    assert all(r["learned_kept"] == (r["changed_codes"] > 0) for r in rows)


def test_the_guard_decision_is_recorded_and_the_output_sqnr_rises(mobile, mobile_data, pair):
    nearest, rounded = pair
    record = rounded._deepshrink_quant["adaround"]
    assert record["kept"] == no_worse(record["fidelity_after"], record["fidelity_before"])
    x = torch.cat(calibration_batches(mobile_data, 256))
    with torch.no_grad():
        reference, plain, learned = mobile(x), nearest(x), rounded(x)
    with_it, without = _sqnr(reference, learned), _sqnr(reference, plain)
    assert with_it >= without + 0.5     # measured: 44.8 dB nearest, 46.0 dB with AdaRound
    assert with_it == pytest.approx(record["fidelity_after"]["sqnr_db"], abs=1e-3)
    assert without == pytest.approx(record["fidelity_before"]["sqnr_db"], abs=1e-3)


def test_rounding_that_lowers_fidelity_is_undone_and_the_run_is_deterministic(mobile, mobile_data, pair):
    nearest, _ = pair
    reference = float_graph(mobile, mobile_data.example_input(), max_batch=1024)[0]
    batches = calibration_batches(mobile_data, 128)
    with torch.no_grad():
        unchanged = [nearest(x) for x in batches]
    # measured against the nearest-rounded outputs themselves, any change lowers fidelity
    q = copy.deepcopy(nearest)
    record = adaround(q, reference, batches, expected=unchanged, iterations=30)
    assert not record["kept"] and record["fidelity_before"]["sqnr_db"] == math.inf
    assert any(r["learned_kept"] for r in record["layers"])
    assert all(torch.equal(a, b) for a, b in zip(_codes(q).values(), _codes(nearest).values()))
    with torch.no_grad():
        for x, before in zip(batches, unchanged):
            torch.testing.assert_close(q(x), before, rtol=0, atol=0)
    first, second = copy.deepcopy(nearest), copy.deepcopy(nearest)
    adaround(first, reference, batches, iterations=30)
    adaround(second, reference, batches, iterations=30)
    assert all(torch.equal(a, b) for a, b in zip(_codes(first).values(), _codes(second).values()))


@pytest.mark.parametrize("suffix", [".pte", ".onnx"])
def test_the_rounded_codes_reach_the_runtime(mobile, mobile_data, pair, tmp_path, suffix):
    from deepshrink.deploy import export
    from deepshrink.evaluation.runners import open_runner

    rounded = pair[1]
    x = torch.cat(calibration_batches(mobile_data, 64))
    result = export(rounded, tmp_path / f"rounded{suffix}", example_input=x[:16],
                    target="xnnpack" if suffix == ".pte" else "onnxruntime")
    assert result.parity_passed
    with torch.no_grad():
        reference, expected = mobile(x), rounded(x)
    runtime = open_runner(tmp_path / f"rounded{suffix}").predict(x)
    assert _sqnr(reference, runtime) >= _sqnr(reference, expected) - 1.0
    assert float((runtime.argmax(1) == expected.argmax(1)).double().mean()) >= 0.98


def test_the_grid_range_is_the_layouts(mobile, mobile_data):
    """A 7-bit layout's weights are in [-63, 63]: re-rounding stays inside it (guarded layouts:
    tests/quantization/test_weight_range.py)."""
    nearest = quantize(mobile, Int8Static(calibration_samples=64, int8_layout="u8s8-reduced"), data=mobile_data,
                       target="onnxruntime")
    rounded = copy.deepcopy(nearest)
    reference = float_graph(mobile, mobile_data.example_input(), max_batch=1024)[0]
    adaround(rounded, reference, calibration_batches(mobile_data, 64), iterations=30)
    for name, codes in _codes(rounded).items():
        assert int(codes.abs().max()) <= 63 and int((codes.int() - _codes(nearest)[name].int()).abs().max()) <= 1
    assert any(int(codes.abs().max()) == 63 for codes in _codes(rounded).values())


def test_rounding_config_round_trips_and_refuses_unknown_values():
    config = Int8Static(rounding="adaround", bias_correction=True)
    assert from_dict(Int8Static, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
    assert Int8Static().rounding == "nearest"
    with pytest.raises(ConfigError, match=r"^Int8Static\.rounding: 'up' is not allowed; choose one of 'nearest', 'adaround'"):
        from_dict(Int8Static, {"rounding": "up"})
