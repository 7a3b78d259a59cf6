"""The .dsk round trip: identical outputs, codes really stored at low bit widths, tampering refused."""
from __future__ import annotations

import json

import pytest
import torch

from deepshrink.core.errors import ArtifactError, ConfigError, ModelLoadError
from deepshrink.formats.container import read_container, size_breakdown
from deepshrink.quantization.api import quantize
from deepshrink.quantization.lowbit import (Codebook, WeightOnly, WeightQAT, load_compressed, quantized_weights,
                                            save_compressed)

from .conftest import small_lenet

X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _pruned_lenet():
    model = small_lenet()
    with torch.no_grad():
        w = model.fc1.weight
        w.mul_((w.abs() > w.abs().median()).float())  # half of fc1 pruned
    return model


@pytest.mark.parametrize("config", [
    WeightOnly(bits=4),
    WeightOnly(bits=3, symmetric=False, granularity="per_tensor", layers={"fc2": 8}),
    WeightOnly(bits=2, symmetric=False, granularity="per_group", group_size=5, layers={"re:fc.*": None}),
    Codebook(method="kmeans", bits=3),
    Codebook(method="equal_population", bits=2, layers={"conv1": None}),
    Codebook(method="power_of_two", bits=4),
])
def test_round_trip_gives_identical_outputs_and_codes(tmp_path, config):
    model = quantize(_pruned_lenet(), config, data=None).eval()
    path = save_compressed(model, tmp_path / "m.dsk")
    loaded = load_compressed(path)
    assert torch.equal(loaded(X), model(X))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert set(quantized_weights(loaded)) == set(quantized_weights(model))
    # saving what was loaded writes the same bytes
    assert save_compressed(loaded, tmp_path / "again.dsk").read_bytes() == path.read_bytes()


def test_a_qat_model_round_trips(tmp_path, blobs):
    from .conftest import new_mlp

    from deepshrink.training import TrainConfig, fit

    model = quantize(new_mlp(), WeightQAT(bits=3, method="lsq", train=TrainConfig(epochs=1, lr=1e-3, batch_size=32)), data=blobs,
                     train_fn=fit)
    loaded = load_compressed(save_compressed(model, tmp_path / "qat.dsk"))
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), model(x))


def test_codes_are_stored_in_about_bits_per_weight(tmp_path):
    model = small_lenet()
    dense = save_compressed(model, tmp_path / "dense.dsk").stat().st_size
    sizes = {}
    for bits in (2, 4, 8):
        m = quantize(small_lenet(), WeightOnly(bits=bits, granularity="per_tensor"), data=None)
        rows = size_breakdown(save_compressed(m, tmp_path / f"w{bits}.dsk"))
        fc1 = next(r for r in rows if r["name"] == "fc1.weight#codes")
        sizes[bits] = fc1["indices_bits"] / fc1["numel"]
    # uniform random init: close to the full width; never above it by more than the coder's overhead
    assert 1.5 < sizes[2] <= 2.1 and 3.5 < sizes[4] <= 4.1 and 6.5 < sizes[8] <= 8.1, sizes
    w4 = (tmp_path / "w4.dsk").stat().st_size
    assert dense / w4 > 2.5  # this tiny model's biases, scales and header are a third of the 4-bit file


@pytest.mark.parametrize("config", [WeightOnly(bits=4), Codebook(bits=4)])
def test_pruning_half_the_weights_saves_over_an_eighth_of_their_bits(tmp_path, config):
    bits = {}
    for label, model in [("dense", small_lenet()), ("pruned", _pruned_lenet())]:
        rows = size_breakdown(save_compressed(quantize(model, config, data=None), tmp_path / f"{label}.dsk"))
        bits[label] = sum(r["total_bits"] for r in rows if r["name"].startswith("fc1.weight"))
    # ~1 bit per weight says pruned or not, then ~4 bits per kept one: 3 of 4 bits for uniform
    # codes (0.75 measured); k-means spreads the kept weights more evenly over its levels (0.82)
    assert bits["pruned"] < 0.85 * bits["dense"], bits


def test_metadata_says_how_each_weight_is_stored(tmp_path):
    model = quantize(small_lenet(), WeightOnly(bits=3, symmetric=False, layers={"conv1": 8}), data=None)
    tensors, meta = read_container(save_compressed(model, tmp_path / "m.dsk", metadata={"note": "x"}))
    assert meta["format"] == "deepshrink.lowbit" and meta["arch"]["zoo"] == "lenet-5" and meta["user"] == {"note": "x"}
    assert meta["weights"]["conv1.weight"] == {"scheme": "affine", "bits": 8, "symmetric": False,
                                               "granularity": "per_channel", "group_size": None}
    assert tensors["conv1.weight#zero_point"].dtype == torch.uint8 and tensors["conv1.weight#scale"].shape == (4,)
    assert "conv1.weight" not in tensors and "conv1.bias" in tensors


def test_a_weight_trained_after_quantizing_is_refused(tmp_path):
    model = quantize(small_lenet(), WeightOnly(bits=4), data=None)
    with torch.no_grad():
        model.fc2.weight.add_(1e-3)
    with pytest.raises(ConfigError, match="fc2.weight differs from its affine codes by up to 0.001"):
        save_compressed(model, tmp_path / "m.dsk")


def test_a_module_without_architecture_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no recorded architecture"):
        save_compressed(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "m.dsk")


def test_inconsistent_records_are_an_artifact_error(tmp_path):
    from deepshrink.formats.container import write_container

    model = quantize(small_lenet(), WeightOnly(bits=4), data=None)
    tensors, meta = read_container(save_compressed(model, tmp_path / "m.dsk"))
    del tensors["fc1.weight#scale"]
    write_container(tmp_path / "bad.dsk", tensors, meta)
    with pytest.raises(ArtifactError, match="weight 'fc1.weight': affine records or spec are incomplete"):
        load_compressed(tmp_path / "bad.dsk")
    write_container(tmp_path / "noarch.dsk", {"w": torch.ones(2)}, {"weights": {}})
    with pytest.raises(ArtifactError, match="no 'arch'"):
        load_compressed(tmp_path / "noarch.dsk")
    json.dumps(meta)  # metadata is plain JSON


def test_float16_tables_halve_the_levels_and_biases_in_the_file_and_round_trip_exactly(tmp_path):
    wide = quantize(_pruned_lenet(), Codebook(method="kmeans", bits=3), data=None).eval()
    narrow = quantize(_pruned_lenet(), Codebook(method="kmeans", bits=3, tables="float16"), data=None).eval()
    layers = ("conv1", "conv2", "fc1", "fc2")
    for name in layers:
        levels = quantized_weights(narrow)[f"{name}.weight"].codebook
        bias = getattr(narrow, name).bias
        assert torch.equal(levels, levels.half().float()) and torch.equal(bias, bias.half().float())
        assert torch.equal(levels, quantized_weights(wide)[f"{name}.weight"].codebook.half().float())
        assert torch.equal(quantized_weights(narrow)[f"{name}.weight"].indices, quantized_weights(wide)[f"{name}.weight"].indices)
    path = save_compressed(narrow, tmp_path / "narrow.dsk")
    loaded = load_compressed(path)
    assert torch.equal(loaded(X), narrow(X))
    assert save_compressed(loaded, tmp_path / "again.dsk").read_bytes() == path.read_bytes()
    # the rounding moves the outputs a little, never the argmax here
    diff = (narrow(X) - wide(X)).abs().max()
    assert 0 < diff < 1e-2 and torch.equal(narrow(X).argmax(-1), wide(X).argmax(-1))
    rows = {r["name"]: r for r in size_breakdown(path)}
    wide_rows = {r["name"]: r for r in size_breakdown(save_compressed(wide, tmp_path / "wide.dsk"))}
    for name in layers:
        assert rows[f"{name}.weight"]["codebook_bits"] * 2 == wide_rows[f"{name}.weight"]["codebook_bits"] >= 8 * 32
        assert rows[f"{name}.bias"]["values_bits"] * 2 == wide_rows[f"{name}.bias"]["values_bits"]


def test_an_unknown_tables_type_is_refused():
    with pytest.raises(ConfigError, match="tables: 'bfloat16' is not allowed; choose 'float32' or 'float16'"):
        Codebook(tables="bfloat16")
