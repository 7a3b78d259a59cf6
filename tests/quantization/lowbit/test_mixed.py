"""Mixed precision: the chooser is exact under the budget and beats uniform where layers differ."""
from __future__ import annotations

import itertools

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.quantization.lowbit import (BitSensitivity, apply_widths, bit_sensitivity, choose_widths,
                                            evaluate_loss_accuracy, measure_front, pareto_front, quantized_weights,
                                            uniform_choice)

WIDTHS = (2, 3, 4, 5, 6, 8)


def _constructed() -> BitSensitivity:
    """A big robust layer, a small sensitive one, a middling one: loss deltas halve per bit (no KL
    measured, so the tests name the ``loss`` objective)."""
    sizes = {"big": 1000, "small": 40, "mid": 300}
    weight = {"big": 0.01, "small": 1.0, "mid": 0.1}
    loss = {n: {b: 1.0 + weight[n] * 2.0 ** (8 - b) for b in WIDTHS} for n in sizes}
    acc = {n: {b: 0.9 - weight[n] * 0.01 * 2.0 ** (8 - b) for b in WIDTHS} for n in sizes}
    return BitSensitivity(baseline_loss=1.0, baseline_accuracy=0.9, sizes=sizes, loss=loss, accuracy=acc)


def _brute_force(s: BitSensitivity, budget: int):
    best = None
    for combo in itertools.product(WIDTHS, repeat=len(s.sizes)):
        widths = dict(zip(s.sizes, combo))
        size = sum(s.sizes[n] * b for n, b in widths.items())
        cost = sum(s.cost(n, b, "loss") for n, b in widths.items())
        if size <= budget and (best is None or (cost, size) < best[:2]):
            best = (cost, size, widths)
    return best


@pytest.mark.parametrize("budget", [2680, 3000, 4 * 1340, 4 * 1340 + 39, 6000, 8 * 1340, 20000])
def test_chooser_respects_the_budget_and_equals_brute_force(budget):
    s = _constructed()
    choice = choose_widths(s, size_budget_bits=budget, objective="loss")
    cost, size, widths = _brute_force(s, budget)
    assert choice.size_bits <= budget
    assert choice.predicted_loss_delta == pytest.approx(cost, abs=1e-12) and choice.size_bits == size
    assert choice.widths == widths


def test_chooser_beats_uniform_4_bit_at_the_same_size():
    s = _constructed()
    uniform = uniform_choice(s, 4)
    choice = choose_widths(s, size_budget_bits=uniform.size_bits, objective="loss")
    assert choice.size_bits <= uniform.size_bits
    # big drops to 3 bits, which pays for the small layer at 8 and mid at 6 (5120 of 5360 bits)
    assert choice.widths == {"big": 3, "small": 8, "mid": 6} and choice.size_bits == 5120
    assert choice.predicted_loss_delta == pytest.approx(0.32 + 1.0 + 0.4)
    assert uniform.predicted_loss_delta == pytest.approx(0.16 + 16.0 + 1.6)


def test_pareto_front_is_sorted_by_size_with_falling_cost_and_contains_the_optima():
    s = _constructed()
    front = pareto_front(s, objective="loss")
    sizes = [c.size_bits for c in front]
    costs = [c.predicted_loss_delta for c in front]
    assert sizes == sorted(sizes) and costs == sorted(costs, reverse=True) and len(set(sizes)) == len(sizes)
    assert front[0].widths == {"big": 2, "small": 2, "mid": 2} and front[-1].widths == {"big": 8, "small": 8, "mid": 8}
    for budget in (2700, 4500, 7000):
        assert choose_widths(s, size_budget_bits=budget, objective="loss") in front


def test_a_latency_budget_is_respected_exactly():
    s = _constructed()
    # in this table the small layer is slow at 8 bits (say, no 8-bit kernel for its shape)
    latency = {n: {b: 1.0 for b in WIDTHS} for n in s.sizes}
    latency["small"][8] = 5.0
    free = choose_widths(s, size_budget_bits=20000, latency_ms=latency, objective="loss")
    bound = choose_widths(s, size_budget_bits=20000, latency_ms=latency, latency_budget_ms=4.0,
                          objective="loss")
    assert free.widths["small"] == 8 and free.latency_ms == 7.0
    assert bound.widths["small"] == 6 and bound.latency_ms == 3.0 and bound.widths["big"] == 8


def test_an_impossible_budget_is_an_error_saying_the_smallest_size():
    with pytest.raises(ConfigError, match="smallest measured assignment takes 2680 bits"):
        choose_widths(_constructed(), size_budget_bits=2679, objective="loss")


def test_accuracy_objective_and_bad_objective():
    s = _constructed()
    assert choose_widths(s, size_budget_bits=5360, objective="accuracy").widths == {"big": 3, "small": 8, "mid": 6}
    with pytest.raises(ConfigError, match="objective"):
        pareto_front(s, objective="bits")
    with pytest.raises(ConfigError, match="'kl' needs the sensitivity's kl table"):
        choose_widths(s, size_budget_bits=5360)


def test_bit_sensitivity_measures_each_layer_alone_and_restores_the_model(trained_mlp, blobs):
    before = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    s = bit_sensitivity(trained_mlp, blobs, (2, 4, 8))
    assert all(torch.equal(v, before[k]) for k, v in trained_mlp.state_dict().items())
    assert not quantized_weights(trained_mlp)
    assert s.sizes == {"hidden.0": 128, "hidden.1": 256, "classifier": 64}
    base_loss, base_acc = evaluate_loss_accuracy(trained_mlp, blobs, "val")
    assert (s.baseline_loss, s.baseline_accuracy) == (base_loss, base_acc)
    # 8 bits is within 1 % of float everywhere; the classifier at 2 bits is clearly worse (on these
    # overlapping blobs the hidden layers' 2-bit noise can even lower the loss a little)
    assert all(abs(s.loss[name][8] - base_loss) < 0.01 * base_loss for name in s.sizes)
    assert s.loss["classifier"][2] > 1.3 * base_loss and s.accuracy["classifier"][2] < base_acc - 0.1
    # the output divergence from float has no such noise: it falls with every bit, for every layer
    for name in s.sizes:
        assert s.kl[name][2] > s.kl[name][4] > s.kl[name][8] > 0
    # one layer alone at 2 bits, measured by hand
    apply_widths(trained_mlp, {"hidden.1": 2})
    assert evaluate_loss_accuracy(trained_mlp, blobs, "val")[0] == s.loss["hidden.1"][2]


def test_measure_front_returns_plain_rows_with_sizes(trained_mlp, blobs, tmp_path):
    s = bit_sensitivity(trained_mlp, blobs, (2, 3, 4, 8))
    result = measure_front(trained_mlp, blobs, s, budgets_bits=[4 * 448], uniform=(8, 4), save_dir=tmp_path,
                           objectives=("kl", "loss"))
    labels = [r["label"] for r in result["measured"]]
    assert labels == ["uniform 8-bit", "uniform 4-bit", "mixed[kl] <= 1792 bits", "mixed[loss] <= 1792 bits"]
    uniform4, by_kl, by_loss = result["measured"][1:]
    assert by_kl["size_bits"] <= uniform4["size_bits"] == 1792 and by_loss["size_bits"] <= 1792
    assert by_kl["predicted_kl"] <= uniform4["predicted_kl"]
    assert by_loss["predicted_loss_delta"] <= uniform4["predicted_loss_delta"]
    assert all(r["dsk_bytes"] > 0 and r["measured_on"] == "dsk" for r in result["measured"])
    assert set(result["front"]) == {"kl", "loss"} and all(result["front"].values())
    assert not quantized_weights(trained_mlp)  # measured on copies


def test_a_layer_that_does_better_quantized_costs_nothing():
    better = BitSensitivity(baseline_loss=1.0, baseline_accuracy=0.9, sizes={"fc": 10}, loss={"fc": {4: 0.8}},
                            accuracy={"fc": {4: 0.95}}, kl={"fc": {4: -1e-9}})   # noise, or a regularising effect
    assert [better.cost("fc", 4, objective) for objective in ("loss", "kl", "accuracy")] == [0.0, 0.0, 0.0]
