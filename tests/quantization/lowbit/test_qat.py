"""QAT: after removal every weight lies on its channel's grid of 2^bits levels; zeros stay zero."""
from __future__ import annotations

import pytest
import torch

from deepshrink.ops.quant_math import qrange
from deepshrink.quantization.api import quantize
from deepshrink.quantization.lowbit import (WeightOnly, WeightQAT, convert_qat, evaluate_loss_accuracy, prepare_qat,
                                            quantize_weights_, quantized_weights)
from deepshrink.training import TrainConfig, fit


def _assert_on_grid(model, bits: int, symmetric: bool):
    record = quantized_weights(model)
    assert set(record) == {"hidden.0.weight", "hidden.1.weight", "classifier.weight"}
    qmin, qmax = qrange(bits, symmetric)
    for name, qw in record.items():
        w = dict(model.named_parameters())[name].detach()
        assert torch.equal(w, qw.dequantize())
        assert qw.q.min() >= qmin and qw.q.max() <= qmax
        for c in range(w.shape[0]):
            grid = (torch.arange(qmin, qmax + 1) - qw.zero_point.reshape(-1)[c]).float() * qw.scale.reshape(-1)[c]
            assert grid.numel() == 2 ** bits
            assert torch.isin(w[c], grid).all()  # every weight is one of the channel's 2^bits levels


@pytest.mark.parametrize("method,symmetric", [("ste", True), ("ste", False), ("lsq", True)])
def test_qat_snaps_weights_onto_2_to_the_bits_levels_per_channel(trained_mlp, blobs, method, symmetric):
    out = quantize(trained_mlp, WeightQAT(bits=2, method=method, symmetric=symmetric,
                                          train=TrainConfig(epochs=1, lr=1e-3, batch_size=32)), data=blobs, train_fn=fit)
    assert out is trained_mlp
    assert not any("parametrizations" in n for n, _ in trained_mlp.named_parameters())
    _assert_on_grid(trained_mlp, 2, symmetric)


def test_lsq_can_use_every_one_of_the_levels():
    # on heavy-tailed rows LSQ's initial step 2 mean|w| / sqrt(qmax) is below max|w| / qmax, so
    # the tails clip onto qmin and qmax and all 2^bits codes are used (min/max scales use 2^bits - 1)
    layer = torch.nn.Linear(64, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([torch.linspace(-1, 1, 64) ** 5, torch.linspace(-2, 2, 64) ** 5]))
    model = torch.nn.Sequential(layer)
    prepare_qat(model, WeightQAT(bits=3, method="lsq", layers={}))
    convert_qat(model)
    for row in model[0].weight:
        assert torch.unique(row).numel() == 8


def test_lsq_learns_the_step_and_beats_ptq_at_2_bits(trained_mlp, blobs):
    ptq = type(trained_mlp)(hidden=(16, 16), in_features=8, num_classes=4)
    ptq.load_state_dict(trained_mlp.state_dict())
    quantize_weights_(ptq, WeightOnly(bits=2))
    prepare_qat(trained_mlp, WeightQAT(bits=2, method="lsq"))
    step = trained_mlp.hidden[0].parametrizations.weight[0].scale
    initial = step.detach().clone()
    fit(trained_mlp, blobs, TrainConfig(epochs=3, lr=3e-3, batch_size=32), progress=False)
    assert not torch.equal(step.detach(), initial)  # the steps are trained parameters
    convert_qat(trained_mlp)
    ptq_loss, _ = evaluate_loss_accuracy(ptq, blobs, "val")
    qat_loss, _ = evaluate_loss_accuracy(trained_mlp, blobs, "val")
    assert qat_loss < 0.8 * ptq_loss, (ptq_loss, qat_loss)


@pytest.mark.parametrize("method", ["ste", "lsq"])
def test_pruned_zeros_stay_zero_through_qat(trained_mlp, blobs, method):
    w = trained_mlp.hidden[1].weight
    with torch.no_grad():
        w.mul_((torch.arange(w.numel()) % 2 == 0).reshape(w.shape).float())
    zeros = w.detach() == 0
    quantize(trained_mlp, WeightQAT(bits=3, method=method, train=TrainConfig(epochs=1, lr=1e-2, batch_size=32)), data=blobs,
             train_fn=fit)
    assert torch.all(trained_mlp.hidden[1].weight[zeros] == 0)


def test_per_group_ste_snaps_to_each_groups_grid(trained_mlp, blobs):
    quantize(trained_mlp, WeightQAT(bits=3, method="ste", granularity="per_group", group_size=8, layers={"hidden.0": None},
                                    train=TrainConfig(epochs=1, lr=1e-3, batch_size=32)), data=blobs, train_fn=fit)
    qw = quantized_weights(trained_mlp)["hidden.1.weight"]
    assert qw.scale.shape == (16, 2)
    for group in trained_mlp.hidden[1].weight.detach().reshape(16, 2, 8).reshape(32, 8):
        assert torch.unique(group).numel() <= 8


def test_convert_without_prepare_and_double_prepare_are_errors(trained_mlp):
    with pytest.raises(Exception, match="call prepare_qat"):
        convert_qat(trained_mlp)
    prepare_qat(trained_mlp, WeightQAT())
    with pytest.raises(Exception, match="already prepared"):
        prepare_qat(trained_mlp, WeightQAT())
