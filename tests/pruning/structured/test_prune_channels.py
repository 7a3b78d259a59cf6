"""The prune_channels verb: widths, MACs, configs, errors, gradual steps, checkpoints, export."""
from __future__ import annotations

import pytest
import torch
import yaml

from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError, ModelLoadError
from deepshrink.core.masks import attach_masks
from deepshrink.models import create, load, save_checkpoint
from deepshrink.models.mobile import mobile_cnn
from deepshrink.models.zoo import get_arch
from deepshrink.pruning.structured import ChannelPruning, prune_channels
from deepshrink.training import TrainConfig, fit

from .conftest import Residual, masked_and_shrunk, randomize_batch_norms

X28 = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def lenet(seed: int = 0):
    torch.manual_seed(seed)
    return create("lenet-5").eval()


def test_lenet5_local_pruning_rounds_to_the_xnnpack_multiple_and_records_zoo_widths(tmp_path):
    model = lenet()
    report = prune_channels(model, ChannelPruning(ratio=0.75, scope="local"), example_input=X28, target="xnnpack")
    # 20 * 0.25 = 5 -> 8; 50 * 0.25 = 12.5 -> 16; 500 * 0.25 = 125 -> 128; the classifier's outputs are the model's
    assert report.layers == {"conv1": (20, 8), "conv2": (50, 16), "fc1": (500, 128), "fc2": (10, 10)}
    assert report.channel_multiple == 8
    # conv1 8*25*24*24 + conv2 16*8*25*8*8 + fc1 256*128 + fc2 128*10
    assert (report.macs_before, report.macs_after) == (2_293_000, 115_200 + 204_800 + 32_768 + 1_280)
    assert report.arch == {"zoo": "lenet-5", "kwargs": {"conv1": 8, "conv2": 16, "fc1": 128}} == get_arch(model)
    save_checkpoint(model, tmp_path / "small.safetensors")
    save_checkpoint(model, tmp_path / "small.pt2", example_input=X28)
    with torch.no_grad():
        expected = model(X28)
        assert torch.equal(load(tmp_path / "small.safetensors")(X28), expected)
        assert float((load(tmp_path / "small.pt2")(X28) - expected).abs().max()) < 1e-6
    assert (tmp_path / "small.safetensors").stat().st_size < 0.2 * 4 * 431_080


def test_round_to_skip_and_overrides():
    model = lenet()
    report = prune_channels(model, ChannelPruning(ratio=0.5, scope="local", round_to=4, skip=("conv1",), overrides={"fc1": 0.9}),
                            example_input=X28)
    # conv1 skipped; conv2 25 -> 24 (nearest multiple of 4); fc1 500 * 0.1 = 50 -> 52 (12.5 rounds up)
    assert report.layers == {"conv1": (20, 20), "conv2": (50, 24), "fc1": (500, 52), "fc2": (10, 10)}


def test_global_scope_on_the_mobile_cnn_keeps_multiples_of_eight():
    torch.manual_seed(0)
    model = randomize_batch_norms(mobile_cnn())
    report = prune_channels(model, ChannelPruning(ratio=0.5, scope="global", importance="bn_scale"), example_input=X28)
    pruned = {n: a for n, (b, a) in report.layers.items() if a != b}
    assert len(pruned) >= 8 and all(a % 8 == 0 and a >= 8 for a in pruned.values())
    assert report.layers["classifier"] == (10, 10)
    removed = sum(g["before"] - g["after"] for g in report.groups) / sum(g["before"] for g in report.groups)
    assert 0.4 <= removed <= 0.6  # half of all channels, give or take the rounding
    assert report.macs_reduction > 1.5
    assert report.arch is None  # not created through the zoo: save it as .pt2
    with pytest.raises(ModelLoadError, match="save it as .pt2"):
        save_checkpoint(model, "unused.safetensors")


def test_taylor_and_gradual_steps_fine_tune_between_steps(trained_mlp, blobs):
    x = blobs.example_input(4)
    config = ChannelPruning(ratio=0.5, scope="local", importance="taylor", round_to=4, steps=2, batches=2, batch_size=32)
    report = prune_channels(trained_mlp, config, example_input=x, data=blobs, train_config=TrainConfig(epochs=1, batch_size=32),
                            train_fn=fit)
    assert [[g["after"] for g in s["groups"]] for s in report.steps] == [[12, 12], [8, 8]]  # 16 * 0.75, then 16 * 0.5
    assert report.steps[0]["ratio"] == 0.25 and 0.25 < report.steps[0]["val_accuracy"] <= 1.0
    assert "val_accuracy" not in report.steps[1]  # the last step is left to the caller's fine-tuning
    assert [layer.out_features for layer in trained_mlp.hidden] == [8, 8]
    assert report.layers["classifier"] == (4, 4)


@pytest.mark.parametrize("config, kwargs, match", [
    (ChannelPruning(layers=("conv9",)), {}, r"ChannelPruning.layers: 'conv9' matches no layer; layers are: conv1, conv2, fc1, fc2"),
    (ChannelPruning(skip=("re:fc[",)), {}, r"ChannelPruning.skip: 're:fc\[' is not a valid regex"),
    (ChannelPruning(steps=3), {}, r"ChannelPruning.steps: 3 steps fine-tune between steps; pass data= and train_config="),
    (ChannelPruning(importance="taylor"), {}, r"'taylor' needs data .* use 'l1'"),
])
def test_errors_name_the_field_and_the_fix(config, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        prune_channels(lenet(), config, example_input=X28, **kwargs)


def test_masked_models_must_be_finalized_first():
    model = lenet()
    attach_masks(model, {"conv2.weight": torch.ones_like(model.conv2.weight)})
    with pytest.raises(ConfigError, match="finalize"):
        prune_channels(model, ChannelPruning(), example_input=X28)


def test_config_survives_a_yaml_round_trip_and_checks_ranges():
    config = ChannelPruning(ratio=0.6, importance="bn_scale", scope="local", round_to=4, layers=("re:block.*",),
                            skip=("stem.0",), overrides={"head.0": 0.3}, steps=3, batches=4)
    assert from_dict(ChannelPruning, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
    with pytest.raises(ConfigError, match=r"ChannelPruning.ratio: 1.0 is outside \[0, 1\)"):
        from_dict(ChannelPruning, {"ratio": 1.0})
    with pytest.raises(ConfigError, match=r"ChannelPruning.importance: 'l3' is not allowed; choose one of 'l1', 'l2', 'bn_scale', 'taylor'"):
        from_dict(ChannelPruning, {"importance": "l3"})


def test_shrunk_model_exports_and_matches_in_executorch_and_onnx_runtime(tmp_path):
    from deepshrink.deploy import export
    from deepshrink.evaluation.runners import open_runner

    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    masked, shrunk, _, _ = masked_and_shrunk(randomize_batch_norms(Residual()), x, ratio=0.5, multiple=8)
    with torch.no_grad():
        expected = masked(x)
    for suffix in (".pte", ".onnx"):
        result = export(shrunk, tmp_path / f"residual{suffix}", example_input=x)
        assert result.parity_max_abs_diff < 1e-5
        produced = open_runner(result.path).predict(x)
        assert float((produced - expected).abs().max()) < 1e-5


def test_mobile_cnn_from_the_zoo_records_its_pruned_widths(tmp_path):
    torch.manual_seed(0)
    model = randomize_batch_norms(create("mobile-cnn"))
    report = prune_channels(model, ChannelPruning(ratio=0.5, scope="local"), example_input=X28)
    assert report.arch == {"zoo": "mobile-cnn", "kwargs": {"stem": 8, "expand": [32, 48, 64, 64, 96], "mid": 16, "branch": 16,
                                                           "head": 128, "num_classes": 10}}
    save_checkpoint(model, tmp_path / "mobile.safetensors")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "mobile.safetensors").eval()(X28), model.eval()(X28))
