"""Codebook quantization: levels per layer, pruned zeros kept, centroid fine-tuning that helps."""
from __future__ import annotations

import math

import pytest
import torch

from deepshrink.core.masks import attach_masks, get_masks
from deepshrink.ops.nonuniform import centroid_gradients
from deepshrink.quantization.api import quantize
from deepshrink.quantization.lowbit import Codebook, codebook_quantize_, evaluate_loss_accuracy, quantized_weights
from deepshrink.quantization.lowbit.codebook import _DecodeShared
from deepshrink.training import TrainConfig, fit


def _prune_every_third(model):
    masks = {}
    with torch.no_grad():
        for name in ("hidden.0", "hidden.1"):
            w = dict(model.named_modules())[name].weight
            masks[f"{name}.weight"] = (torch.arange(w.numel()) % 3 != 0).reshape(w.shape)
            w.mul_(masks[f"{name}.weight"].float())
    return masks


@pytest.mark.parametrize("method", ["kmeans", "equal_population", "power_of_two"])
def test_pruned_zeros_stay_zero_and_are_left_out_of_the_fit(trained_mlp, method):
    masks = _prune_every_third(trained_mlp)
    quantize(trained_mlp, Codebook(method=method, bits=2), data=None)
    for name, mask in masks.items():
        w = dict(trained_mlp.named_parameters())[name]
        qw = quantized_weights(trained_mlp)[name]
        assert torch.all(w[~mask] == 0)
        levels = torch.unique(w[mask])
        assert levels.numel() <= 4 and set(levels.tolist()) <= set(qw.codebook.tolist())
        if method != "power_of_two":  # fitted to the kept weights only, so no level is spent on 0
            assert 0.0 not in qw.codebook.tolist()


def test_attached_masks_are_honoured_when_called_directly(trained_mlp):
    masks = _prune_every_third(trained_mlp)
    attach_masks(trained_mlp, masks)
    codebook_quantize_(trained_mlp, Codebook(method="kmeans", bits=3))
    w = trained_mlp.hidden[0].weight
    assert torch.all(w[~masks["hidden.0.weight"]] == 0) and get_masks(trained_mlp)  # masks untouched


def test_power_of_two_levels_are_zero_or_signed_powers_of_two(trained_mlp):
    quantize(trained_mlp, Codebook(method="power_of_two", bits=3), data=None)
    for name, qw in quantized_weights(trained_mlp).items():
        nonzero = [abs(v) for v in qw.codebook.tolist() if v != 0]
        assert qw.codebook.numel() == 7 and all(math.log2(v).is_integer() for v in nonzero)


def test_kmeans_error_falls_with_bits(trained_mlp):
    w = trained_mlp.hidden[1].weight.detach().clone()
    errors = []
    for bits in (2, 3, 4):
        model = type(trained_mlp)(hidden=(16, 16), in_features=8, num_classes=4)
        model.load_state_dict(trained_mlp.state_dict())
        codebook_quantize_(model, Codebook(bits=bits, layers={"hidden.1": bits, "*": None}))
        errors.append(((model.hidden[1].weight - w) ** 2).mean().item())
    assert errors[0] > 2 * errors[1] > 4 * errors[2] > 0


def test_the_shared_weight_backward_is_the_members_summed_gradient():
    torch.manual_seed(0)
    codebook = torch.tensor([-0.5, 0.1, 0.7], requires_grad=True)
    indices = torch.randint(0, 3, (5, 4), dtype=torch.uint8)
    mask = torch.rand(5, 4) > 0.3
    grad = torch.randn(5, 4)
    _DecodeShared.apply(codebook, indices, mask).backward(grad)
    assert torch.equal(codebook.grad, centroid_gradients(grad, indices, 3, mask=mask))


def test_centroid_finetuning_reduces_training_loss_and_keeps_indices(trained_mlp, blobs):
    quantize(trained_mlp, Codebook(method="kmeans", bits=2), data=None)
    before = {n: (qw.codebook.clone(), qw.indices.clone()) for n, qw in quantized_weights(trained_mlp).items()}
    loss_before, _ = evaluate_loss_accuracy(trained_mlp, blobs, "train")
    finetuned = type(trained_mlp)(hidden=(16, 16), in_features=8, num_classes=4)
    finetuned.load_state_dict(trained_mlp.state_dict())
    codebook_quantize_(finetuned, Codebook(method="kmeans", bits=2, train=TrainConfig(epochs=3, lr=3e-3, batch_size=32)),
                       data=blobs, train_fn=fit)
    loss_after, _ = evaluate_loss_accuracy(finetuned, blobs, "train")
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)
    for name, qw in quantized_weights(finetuned).items():
        codebook, indices = before[name]
        assert torch.equal(qw.indices, indices) and not torch.equal(qw.codebook, codebook)
        w = dict(finetuned.named_parameters())[name]
        assert torch.equal(w.detach(), qw.codebook[qw.indices.long()])  # weights are the trained levels
        assert torch.unique(w).numel() <= 4
    assert not any("parametrizations" in n for n, _ in finetuned.named_parameters())


def test_finetuning_without_data_is_an_error(trained_mlp):
    with pytest.raises(Exception, match="Codebook.train: fine-tuning needs training data"):
        codebook_quantize_(trained_mlp, Codebook(train=TrainConfig(epochs=1, lr=1e-4)))
