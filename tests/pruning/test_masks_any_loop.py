"""Masks held by the module (``torch.nn.utils.parametrize``): pruned weights stay exactly 0 under any
training loop — hand-written SGD with momentum and weight decay, Adam, AdamW, a Hugging Face
``Trainer`` — the numbers equal the old re-mask-after-every-step loop bit for bit, state dicts
round-trip the masks, and ``finalize`` leaves a plain module with exact (+0.0) zeros."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import deepshrink as ds
from deepshrink.core.masks import attach_masks, get_masks, load_masked_state_dict, masks_in_state_dict, without_masks
from deepshrink.models.zoo import MLP

LAYERS = ("hidden.0", "hidden.1")


def _pruned(trained_mlp, sparsity: float = 0.8):
    model = ds.prune(trained_mlp, ds.MagnitudePruning(sparsity=sparsity))
    assert model is trained_mlp   # in place, and returned
    return model, {n: m.clone() for n, m in get_masks(model).items()}


def _weights(model) -> dict[str, torch.Tensor]:
    """What the model computes with, by layer: a masked weight as its parametrization returns it."""
    return {layer: model.get_submodule(layer).weight.detach().clone() for layer in (*LAYERS, "classifier")}


def _hand_loop(model, data, optimizer, *, epochs: int = 3, after_step=None) -> None:
    """A user's own loop: nothing in it knows about pruning."""
    torch.manual_seed(0)
    model.train()
    for _ in range(epochs):
        for x, y in data.loader("train", batch_size=32, shuffle=True, seed=0):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if after_step is not None:
                after_step()
    model.eval()


def _check_zeros_held_and_finalize(model, masks, before) -> None:
    after = _weights(model)
    for name, keep in masks.items():
        layer = name[: -len(".weight")]
        assert bool((after[layer][~keep] == 0).all()), layer                      # pruned: still exactly 0
        assert not torch.equal(after[layer][keep], before[layer][keep]), layer    # kept: trained
    ds.finalize(model)
    assert not get_masks(model)
    for name, keep in masks.items():
        module = model.get_submodule(name[: -len(".weight")])
        assert type(module) is nn.Linear and not parametrize.is_parametrized(module)   # a plain module again
        w = module.weight.detach()
        assert bool((w[~keep] == 0).all()) and not bool(torch.signbit(w[~keep]).any())   # exact +0.0
        assert int((w == 0).sum()) == int((~keep).sum())
    assert list(model.state_dict()) == ["hidden.0.weight", "hidden.0.bias", "hidden.1.weight", "hidden.1.bias",
                                        "classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adam-wd", "adamw"])
def test_a_plain_loop_keeps_pruned_weights_at_zero(trained_mlp, blobs, make_optimizer):
    model, masks = _pruned(trained_mlp)
    before = _weights(model)
    _hand_loop(model, blobs, make_optimizer(model.parameters()))
    _check_zeros_held_and_finalize(model, masks, before)


def test_the_numbers_equal_re_masking_after_every_step(trained_mlp, blobs):
    """The old mechanism (zero the pruned weights after each optimizer step, in our loop only) and
    the parametrization give the same weights, bit for bit: same seed, same accuracy."""
    reference = copy.deepcopy(trained_mlp)
    model, masks = _pruned(trained_mlp)
    with torch.no_grad():
        for name, keep in masks.items():
            reference.get_submodule(name[: -len(".weight")]).weight.mul_(keep)

    def remask():
        with torch.no_grad():
            for name, keep in masks.items():
                reference.get_submodule(name[: -len(".weight")]).weight.mul_(keep)

    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    _hand_loop(model, blobs, sgd(model))
    _hand_loop(reference, blobs, sgd(reference), after_step=remask)
    ds.finalize(model)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = blobs.example_input(64)
    assert torch.equal(model(x), reference(x))


def test_a_hugging_face_trainer_keeps_pruned_weights_at_zero(trained_mlp, blobs, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Classifier(nn.Module):
        """The calling convention Trainer expects: keyword inputs, a loss when labels come."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"logits": logits, **({"loss": F.cross_entropy(logits, labels)} if labels is not None else {})}

    model, masks = _pruned(trained_mlp)
    before = _weights(model)
    rows = [{"x": x, "labels": int(y)} for x, y in blobs.train]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=32, learning_rate=1e-2,
        weight_decay=0.1, save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    transformers.Trainer(model=Classifier(model), args=args, train_dataset=rows).train()
    _check_zeros_held_and_finalize(model.eval(), masks, before)


def test_a_state_dict_round_trips_the_masks(trained_mlp, blobs):
    model, masks = _pruned(trained_mlp)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(masks_in_state_dict(state)) == set(masks)
    fresh = MLP(hidden=(16, 16), in_features=8, num_classes=4)   # no masks yet
    load_masked_state_dict(fresh, state)
    assert all(torch.equal(get_masks(fresh)[n], m) for n, m in masks.items())
    x = blobs.example_input(32)
    assert torch.equal(fresh(x), model(x))
    twin = copy.deepcopy(model)   # a masked model takes the state dict as it is
    twin.load_state_dict(state)
    assert torch.equal(twin(x), model(x))
    # and the reloaded masks still hold through training
    before = _weights(fresh)
    _hand_loop(fresh, blobs, torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2), epochs=1)
    _check_zeros_held_and_finalize(fresh, masks, before)


def test_masks_step_aside_and_come_back(trained_mlp):
    model, masks = _pruned(trained_mlp)
    with without_masks(model) as lifted:
        assert not get_masks(model) and set(lifted) == set(masks)
        assert list(model.state_dict()) == list(MLP(hidden=(16, 16), in_features=8, num_classes=4).state_dict())
    assert all(torch.equal(get_masks(model)[n], m) for n, m in masks.items())


def test_attach_checks_names_and_shapes(trained_mlp):
    with pytest.raises(KeyError, match="has no parameter of that name"):
        attach_masks(trained_mlp, {"hidden.7.weight": torch.ones(16, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"has shape \(8, 16\), parameter \(16, 8\)"):
        attach_masks(trained_mlp, {"hidden.0.weight": torch.ones(8, 16, dtype=torch.bool)})
