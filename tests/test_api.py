"""The two verbs: every config in the namespace and the registries, the recipe reading the registries,
one return convention, training passed in (your own loop included), and the deprecated verbs as
warning aliases that return the old shapes with the same numbers."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import yaml
from torch import nn

import deepshrink as ds
from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import get_masks
from deepshrink.data.splits import from_tensors
from deepshrink.models.zoo import MLP
from deepshrink.pipeline.recipe import Stage, parse_prune, parse_stage
from deepshrink.pruning import PRUNERS, PruningConfig, register_criterion
from deepshrink.quantization import QUANTIZERS
from deepshrink.training import TrainConfig, accuracy, fit


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)

    def draw(n):
        centers = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [-2.0] * 4 + [0.0] * 4, [0.0] * 4 + [-2.0] * 4])
        y = torch.arange(n) % 4
        return centers[y] + 1.5 * torch.randn(n, 8, generator=g), y

    return from_tensors("blobs", draw(400), draw(100), num_classes=4, val_fraction=0.25, calib_size=32, seed=0)


@pytest.fixture(scope="module")
def _trained(blobs):
    torch.manual_seed(0)
    model = MLP(hidden=(16, 16), in_features=8, num_classes=4)
    fit(model, blobs, TrainConfig(epochs=4, lr=1e-2, batch_size=32), progress=False)
    return model.eval()


@pytest.fixture
def mlp(_trained):
    return copy.deepcopy(_trained)


def test_every_registered_config_is_in_the_namespace():
    for klass in [*PRUNERS.configs(), *QUANTIZERS.configs()]:
        if klass.__module__.startswith("deepshrink."):   # not the criterion this file registers
            assert getattr(ds, klass.__name__) is klass, klass
    for name in ("ScheduledPruning", "OneShot", "Iterative", "Gradual", "TrainConfig", "Distillation", "Int8WithinBudget",
                 "VariationalDropout", "ChannelPruning"):
        assert name in dir(ds) and getattr(ds, name) is not None
    assert list(PRUNERS.names())[:6] == ["magnitude", "gradient", "taylor", "random", "variational", "channels"]
    assert list(QUANTIZERS.names()) == ["int8-static", "int8-dynamic", "int8-qat", "int8-budget", "weight-only",
                                        "weight-qat", "codebook", "int8-dynamic-lowbit"]
    assert ds.ScheduledPruning in PRUNERS   # a transform, not a recipe method: the recipe spells it `schedule:`


@dataclasses.dataclass(frozen=True)
class LargestFirst(PruningConfig):
    """A criterion of the user's: prune the *largest* weights (for the test only)."""


if LargestFirst not in PRUNERS:
    @register_criterion(LargestFirst, name="test-largest-first")
    def _largest_first(model, weights, config, data):
        return {n: -w.detach().abs() for n, w in weights.items()}


def test_a_registered_criterion_is_a_verb_config_and_a_recipe_method(mlp):
    config = LargestFirst(sparsity=0.5, scope="local")
    stage = parse_prune({"method": "test-largest-first", "sparsity": 0.5, "scope": "local"}, "stages[0].prune")
    assert stage.pruning == config
    assert Stage("prune", stage).as_dict() == {"prune": {"method": "test-largest-first", **to_dict(config)}}
    ds.prune(mlp, config)
    w, keep = mlp.hidden[0].weight.detach(), get_masks(mlp)["hidden.0.weight"]
    assert ds.prune_report(mlp).layers["hidden.0"] == (64, 128)
    raw = mlp.hidden[0].parametrizations.weight.original.detach()
    assert bool((w[~keep] == 0).all()) and float(w[keep].abs().max()) <= float(raw.abs().max())


def test_the_recipe_round_trips_every_changed_config():
    for config in (ds.ChannelPruning(ratio=0.5, steps=2, train=TrainConfig(epochs=2, lr=5e-4)),
                   ds.Int8QAT(train=TrainConfig(epochs=2, lr=5e-4, batch_size=32), per_channel=True),
                   ds.WeightQAT(bits=3, train=TrainConfig(epochs=1, distill=ds.Distillation())),
                   ds.Codebook(bits=4, train=TrainConfig(epochs=2, lr=1e-4)),
                   ds.Int8WithinBudget(max_drop_pt=1.0, qat=ds.Int8QAT(train=TrainConfig(epochs=3)))):
        assert from_dict(type(config), yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
        if not isinstance(config, ds.ChannelPruning):
            stage = Stage("quantize", config)
            assert parse_stage(yaml.safe_load(yaml.safe_dump(stage.as_dict())), "stages[0]") == stage


def test_one_return_convention(mlp, blobs):
    assert ds.prune(mlp, ds.MagnitudePruning(sparsity=0.5)) is mlp                  # in place, returned
    ds.finalize(mlp)
    assert ds.prune(mlp, ds.ChannelPruning(ratio=0.5, scope="local"), data=blobs) is mlp
    assert isinstance(ds.prune_report(mlp), ds.pruning.StructuredReport) and mlp.hidden[0].out_features == 8
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    q = ds.quantize(mlp, ds.Int8Static(), data=blobs)                                  # a new graph
    assert q is not mlp and all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())
    assert ds.quantize_report(q)["scheme"] == "Int8Static"
    assert ds.quantize(mlp, ds.WeightOnly(bits=4), data=None) is mlp                  # weight-only: in place, returned
    assert ds.quantize_report(mlp)["config"]["bits"] == 4


def test_the_subpackage_verbs_need_the_loop_and_change_nothing_without_it(mlp, blobs):
    from deepshrink.pruning import prune
    from deepshrink.quantization import quantize

    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    scheduled = ds.ScheduledPruning(ds.MagnitudePruning(sparsity=0.8), ds.Iterative((0.5,)), TrainConfig(epochs=2))
    for call in (lambda: prune(mlp, scheduled, data=blobs),
                 lambda: prune(mlp, ds.VariationalDropout(train=TrainConfig(epochs=1)), data=blobs),
                 lambda: prune(mlp, ds.ChannelPruning(steps=2, train=TrainConfig(epochs=1)), data=blobs),
                 lambda: quantize(mlp, ds.WeightQAT(bits=4), data=blobs),
                 lambda: quantize(mlp, ds.Codebook(bits=4, train=TrainConfig(epochs=1)), data=blobs),
                 lambda: quantize(mlp, ds.Int8WithinBudget(), data=blobs, train_fn=fit)):
        with pytest.raises(ConfigError, match=r"(trains: pass train_fn=|measures accuracy: pass accuracy_fn=)"):
            call()
        assert not get_masks(mlp) and all(torch.equal(v, state[k]) for k, v in mlp.state_dict().items())


def test_your_own_loop_trains_every_round(mlp, blobs):
    calls = []

    def my_loop(model, data, config):   # takes neither teacher nor penalty: fine for a schedule
        calls.append(config.epochs)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        for _ in range(config.epochs):
            for x, y in data.loader("train", batch_size=32, shuffle=True, seed=config.seed):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

    config = ds.ScheduledPruning(ds.MagnitudePruning(sparsity=0.9), ds.Iterative((0.5, 0.75)), TrainConfig(epochs=4))
    report = ds.prune_report(ds.prune(mlp, config, data=blobs, train_fn=my_loop))
    assert calls == [1, 1, 2] and [s.sparsity for s in report.steps] == [0.5, 0.75, 0.9]
    assert all(s.history is None for s in report.steps)   # what the loop returned
    assert report.sparsity == pytest.approx(0.9, abs=1 / 384)
    for name, keep in get_masks(mlp).items():
        assert bool((mlp.get_submodule(name[:-7]).weight[~keep] == 0).all()), name


def test_deprecated_verbs_warn_and_give_the_new_verbs_numbers(_trained, blobs):
    schedule, train = ds.Iterative((0.5, 0.75)), TrainConfig(epochs=3, lr=1e-2, batch_size=32)
    new = copy.deepcopy(_trained)
    steps = ds.prune_report(ds.prune(new, ds.ScheduledPruning(ds.MagnitudePruning(sparsity=0.9), schedule, train),
                                     data=blobs)).steps
    old = copy.deepcopy(_trained)
    with pytest.warns(DeprecationWarning, match="prune_with_schedule is deprecated"):
        old_steps = ds.prune_with_schedule(old, ds.MagnitudePruning(sparsity=0.9), schedule, data=blobs, train_config=train)
    assert [s.report for s in old_steps] == [s.report for s in steps]
    assert [s.history.val_accuracy for s in old_steps] == [s.history.val_accuracy for s in steps]
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())

    x = blobs.example_input(4)
    a, b = copy.deepcopy(_trained), copy.deepcopy(_trained)
    with pytest.warns(DeprecationWarning, match="prune_channels is deprecated"):
        old_report = ds.prune_channels(a, ds.ChannelPruning(ratio=0.5, scope="local"), example_input=x)
    assert old_report.layers == ds.prune_report(ds.prune(b, ds.ChannelPruning(ratio=0.5, scope="local"), example_input=x)).layers

    budget = dict(max_drop_pt=100.0, ptq=ds.Int8Static(per_channel=False))
    with pytest.warns(DeprecationWarning, match="quantize_within_budget is deprecated"):
        _, old_budget = ds.quantize_within_budget(_trained, blobs, **budget)
    q = ds.quantize(_trained, ds.Int8WithinBudget(**budget), data=blobs)
    assert ds.quantize_report(q)["budget"] == old_budget.as_dict() and old_budget.met
    assert old_budget.steps[0].accuracy == accuracy(q, blobs.loader("val", batch_size=512), reference=_trained)

    from deepshrink.pruning import prune_with_schedule
    from deepshrink.pruning.structured import prune_channels
    from deepshrink.quantization import quantize_within_budget

    for call in (lambda: prune_with_schedule(copy.deepcopy(_trained), ds.MagnitudePruning(sparsity=0.5), ds.OneShot(),
                                             data=blobs, train_config=TrainConfig(epochs=0)),
                 lambda: prune_channels(copy.deepcopy(_trained), ds.ChannelPruning(), example_input=x),
                 lambda: quantize_within_budget(_trained, blobs, max_drop_pt=-1.0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
            except ConfigError:
                pass
        assert any(issubclass(w.category, DeprecationWarning) for w in caught)
