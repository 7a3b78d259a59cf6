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
    rows = corrected._deepshrink_quant["bias_correction"]["layers"]
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


def _float_reference(mobile, mobile_data):
    from deepshrink.quantization.graph_passes import float_graph

    return float_graph(mobile, mobile_data.example_input(), max_batch=1024)[0]


def test_a_correction_that_lowers_fidelity_is_undone(mobile, mobile_data, pair):
    import copy

    from deepshrink.quantization.bias_correction import calibration_batches, correct_bias

    plain, _ = pair
    q = copy.deepcopy(plain)
    batches = calibration_batches(mobile_data, 128)
    with torch.no_grad():
        uncorrected = [q(x) for x in batches]
    # measured against the uncorrected outputs themselves, any change lowers fidelity
    record = correct_bias(q, _float_reference(mobile, mobile_data), batches, expected=uncorrected)
    assert not record["kept"] and record["fidelity_before"]["sqnr_db"] == float("inf")
    assert record["layers"][-1]["mean_abs_shift_after"] < record["layers"][-1]["mean_abs_shift_before"]
    with torch.no_grad():
        for x, before in zip(batches, uncorrected):
            torch.testing.assert_close(q(x), before, rtol=0, atol=0)


def test_each_layer_is_corrected_after_the_ones_before_it_in_one_pass(mobile, mobile_data, pair):
    """The layer-major pass gives every layer the float mean at once: what the old loop reached
    with two whole-model runs per layer."""
    import copy

    from deepshrink.quantization.bias_correction import calibration_batches, channel_means, correct_layer_by_layer
    from deepshrink.quantization.graph_passes import bias_node, weighted_nodes

    plain, _ = pair
    q = copy.deepcopy(plain)
    batches = calibration_batches(mobile_data, 128)
    layers = weighted_nodes(q)
    names = [n.name for n in layers]
    assert len(names) == 4
    target, _ = channel_means(_float_reference(mobile, mobile_data), batches, names)
    biases = {n.name: bias_node(q, n, create=True) for n in layers}
    correct_layer_by_layer(q, batches, target, biases)
    after, _ = channel_means(q, batches, names)
    for name in names:
        torch.testing.assert_close(after[name], target[name], rtol=0, atol=1e-5)


def test_bias_correction_reports_progress_through_the_progress_lines(mobile, mobile_data, caplog, monkeypatch):
    import logging

    import deepshrink.core.progress as progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="deepshrink"):
        quantize(mobile, Int8Static(per_channel=False, bias_correction=True, calibration_samples=64), data=mobile_data)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("bias correction: layer by layer: ") for line in lines)
    assert any(line.startswith("bias correction kept") or line.startswith("bias correction dropped") for line in lines)


def test_a_correction_fitted_to_too_few_samples_is_caught_on_the_other_half(mobile, mobile_data, pair):
    """Two calibration samples: fitted to both, the correction looks good on them (in-sample SQNR
    up 3.5 dB); fitted to one and scored on the other it lowers SQNR, and it is dropped."""
    import copy

    from deepshrink.quantization.bias_correction import calibration_batches, channel_means, correct_bias

    plain, _ = pair
    q = copy.deepcopy(plain)
    x = calibration_batches(mobile_data, 2)[0]
    batches = [x[:1], x[1:2]]
    reference = _float_reference(mobile, mobile_data)
    expected = channel_means(reference, batches, [])[1]
    with torch.no_grad():
        before = [q(b) for b in batches]
    record = correct_bias(q, reference, batches, expected=expected)
    assert record["fidelity_after"]["sqnr_db"] > record["fidelity_before"]["sqnr_db"] + 3
    assert record["fidelity_held_out_after"]["sqnr_db"] < record["fidelity_held_out_before"]["sqnr_db"]
    assert not record["kept"]
    with torch.no_grad():
        for b, out in zip(batches, before):
            torch.testing.assert_close(q(b), out, rtol=0, atol=0)


def test_the_held_out_check_scores_each_half_with_the_other_halfs_correction(mobile, mobile_data, pair):
    import copy

    from deepshrink.quantization.bias_correction import (_cross_validated, _folds, calibration_batches, channel_means,
                                                         correct_layer_by_layer, output_fidelity)
    from deepshrink.quantization.graph_passes import bias_node, get_attr_tensor, weighted_nodes

    plain, _ = pair
    reference = _float_reference(mobile, mobile_data)
    lone = calibration_batches(mobile_data, 10)
    expected = channel_means(reference, lone, [])[1]
    with torch.no_grad():
        uncorrected = [plain(lone[0])]
    folds = _folds(lone, expected, uncorrected)
    assert [[part[0].shape[0] for part in f] for f in folds] == [[5, 5, 5], [5, 5, 5]]
    torch.testing.assert_close(folds[1][1][0], expected[0][5:], rtol=0, atol=0)
    torch.testing.assert_close(folds[1][2][0], uncorrected[0][5:], rtol=0, atol=0)
    assert _folds([lone[0][:1]], [expected[0][:1]]) is None
    two = _folds([lone[0][:4], lone[0][4:]], expected * 2)   # two batches: one a fold
    assert torch.equal(two[1][0][0], lone[0][4:]) and two[1][1][0] is expected[0]

    q = copy.deepcopy(plain)
    names = [n.name for n in weighted_nodes(q)]
    biases = {n.name: bias_node(q, n, create=True) for n in weighted_nodes(q)}
    original = {k: get_attr_tensor(q, v).clone() for k, v in biases.items()}
    held = _cross_validated(q, reference, folds, names, biases, original)
    for k, v in biases.items():   # left as it was
        assert torch.equal(get_attr_tensor(q, v), original[k])
    # by hand: each half scored by the correction fitted on the other, the two pooled
    scored, expected_scored, unscored = [], [], []
    for fit, (score, score_expected, _) in ((folds[0][0], folds[1]), (folds[1][0], folds[0])):
        fitted = copy.deepcopy(q)
        fitted_biases = {n.name: bias_node(fitted, n, create=True) for n in weighted_nodes(fitted)}
        correct_layer_by_layer(fitted, fit, channel_means(reference, fit, names)[0], fitted_biases)
        with torch.no_grad():
            scored.append(fitted(score[0]))
            unscored.append(q(score[0]))
        expected_scored += score_expected
    by_hand = output_fidelity(expected_scored, scored)
    assert held["after"]["agreement"] == by_hand["agreement"]
    assert abs(held["after"]["sqnr_db"] - by_hand["sqnr_db"]) < 1e-6
    assert held["before"] == output_fidelity(expected_scored, unscored)
