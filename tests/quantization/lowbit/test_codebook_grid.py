"""Codebook(grid="int8"): k-means levels snapped onto each output channel's int8 grid, so that the
``.dsk`` and the int8 runtime files (``Int8DynamicLowBit(bits=8)``) hold exactly the same numbers.

A LeNet-300-100 trained for one epoch on digits (module fixture); every number asserted here was
measured on it (see the comments).
"""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

import deepshrink
from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.deploy import export
from deepshrink.deploy.parity import measure
from deepshrink.evaluation.runners import open_runner
from deepshrink.formats.container import read_container, record_for, write_container
from deepshrink.ops.nonuniform import decode_on_grid, grid_scales, snap_to_grid
from deepshrink.quantization.lowbit import (Codebook, DynamicQuantLinear, Int8DynamicLowBit, load_compressed,
                                            quantized_weights, save_compressed)
from deepshrink.quantization.lowbit.codebook import GridCodebookWeight, _DecodeOnGrid
from deepshrink.quantization.lowbit.runtime import fit_runtime_weight
from deepshrink.training import TrainConfig, accuracy

LAYERS = {"hidden.0": 300, "hidden.1": 100, "classifier": 10}   # output channels of lenet-300-100
SCALE_BYTES = 4 * sum(LAYERS.values())                            # one float32 scale per output channel




@pytest.fixture(scope="module")
def pair(trained):
    """(float codebook, int8-grid codebook) at 4 bits, both from the same trained model."""
    return ({grid: deepshrink.quantize(copy.deepcopy(trained), Codebook(bits=4, grid=grid), data=None)
             for grid in ("float", "int8")})


def _weights(model):
    return {name: dict(model.named_parameters())[f"{name}.weight"].detach() for name in LAYERS}


def test_config_round_trips_and_reads_from_a_recipe_stage():
    from deepshrink.pipeline.recipe import parse_stage

    config = Codebook(bits=5, grid="int8", train=TrainConfig(epochs=1, lr=1e-4))
    assert from_dict(Codebook, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
    stage = parse_stage({"quantize": {"scheme": "codebook", "bits": 4, "grid": "int8"}}, "stages[0]")
    assert stage.config == Codebook(bits=4, grid="int8")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.quantize\.grid: 'int4' is not allowed; choose one of "
                                          r"'float', 'int8'"):
        parse_stage({"quantize": {"scheme": "codebook", "grid": "int4"}}, "stages[0]")


@pytest.mark.parametrize("make,fragment", [
    (lambda: Codebook(grid="int4"), "grid: 'int4' is not allowed; choose 'float' or 'int8'"),
    (lambda: Codebook(method="power_of_two", grid="int8"), "grid: int8 would move power_of_two's levels off the powers"),
])
def test_bad_grids_raise_config_error_naming_the_key(make, fragment):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(fragment)


def test_snapped_levels_are_integer_multiples_of_the_channel_scale(trained, pair):
    before = _weights(trained)
    for name, w in _weights(pair["int8"]).items():
        qw = quantized_weights(pair["int8"])[f"{name}.weight"]
        assert isinstance(qw, GridCodebookWeight) and qw.spec() == {"scheme": "codebook", "method": "kmeans",
                                                                     "bits": 4, "grid": "int8"}
        # the scale is the int8 runtime's per-channel min/max scale of the weight before quantizing
        runtime = fit_runtime_weight(before[name], bits=8, group_size=None)
        assert torch.equal(qw.scale, runtime.scale.reshape(-1))
        codes = qw.int8_weight()
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
        assert torch.equal(codes.float() * qw.scale[:, None], w)               # exactly code x scale, bit for bit
        assert torch.equal(torch.round(w / qw.scale[:, None]) * qw.scale[:, None], w)
        assert max(torch.unique(row).numel() for row in w) <= 2 ** 4             # 16 values per channel at most
        # the same indices as the float codebook; each value is its float level rounded to the grid
        # (within half a step) or, beyond the channel's range, clipped at +-127 steps
        float_w = _weights(pair["float"])[name]
        limit = 127 * qw.scale[:, None]
        inside = float_w.abs() <= limit
        assert bool(((w - float_w).abs() <= qw.scale[:, None] / 2 * (1 + 1e-6))[inside].all())
        assert torch.equal(w[~inside], (torch.sign(float_w) * limit.expand_as(w))[~inside])


def test_int8_runtime_takes_the_recorded_codes_and_scales_exactly(pair):
    grid = pair["int8"]
    runtime = deepshrink.quantize(copy.deepcopy(grid), Int8DynamicLowBit(bits=8, group_size=None), data=None)
    for name, w in _weights(grid).items():
        layer = runtime.get_submodule(name)
        qw = quantized_weights(grid)[f"{name}.weight"]
        assert isinstance(layer, DynamicQuantLinear) and layer.bits == 8
        assert torch.equal(layer.qdata, qw.int8_weight()) and torch.equal(layer.scale.reshape(-1), qw.scale)
        assert torch.equal(layer.dequantized_weight(), w)
        # min/max codes recomputed from the snapped weight are not these: measured, all but
        # 1/300, 2/100 and 3/10 channels differ (their largest level snaps below 127 steps)
        recomputed = fit_runtime_weight(w, bits=8, group_size=None)
        exact_rows = int((recomputed.q.float() * recomputed.scale == w).all(1).sum())
        assert exact_rows <= LAYERS[name] // 2
    assert quantized_weights(runtime) == {}   # the replaced Linears' codebook records went with them


def test_a_weight_changed_after_snapping_is_quantized_afresh(pair):
    model = copy.deepcopy(pair["int8"])
    with torch.no_grad():
        model.classifier.weight.add_(1e-3)
    runtime = deepshrink.quantize(model, Int8DynamicLowBit(bits=8, group_size=None), data=None)
    expected = fit_runtime_weight(pair["int8"].classifier.weight + 1e-3, bits=8, group_size=None)
    assert torch.equal(runtime.classifier.qdata, expected.q) and torch.equal(runtime.classifier.scale, expected.scale)


def test_pte_and_onnx_hold_the_dsk_numbers_and_pass_parity(pair, batch, tmp_path):
    grid = pair["int8"]
    runtime = deepshrink.quantize(copy.deepcopy(grid), Int8DynamicLowBit(bits=8, group_size=None), data=None)
    loaded = load_compressed(save_compressed(grid, tmp_path / "grid.dsk"))
    for name, w in _weights(loaded).items():
        assert torch.equal(runtime.get_submodule(name).dequantized_weight(), w)   # .dsk == runtime weights
    with torch.no_grad():
        eager = grid(batch)
    for suffix in (".pte", ".onnx"):
        result = export(runtime, tmp_path / f"grid{suffix}", example_input=batch[:64])
        assert result.parity_passed
        # int8 codes plus fp32 scales and biases: measured 275,112 B (.pte) and 284,474 B (.onnx)
        assert 266_200 < result.file_bytes < 300_000
        produced = open_runner(result.path, threads=1).predict(batch)
        # against the eager snapped model (fp32 activations): measured max |diff| 0.0157 of a 7.67
        # range, p99 0.13 % of it, top-1 identical on 200 images
        parity = measure(eager, produced, runtime=suffix, step=None, quantized=True)
        assert parity.passed and parity.argmax_agreement == 1.0
        assert parity.max_abs_diff <= 0.01 * float(eager.max() - eager.min())


def test_dsk_costs_one_scale_per_channel_more_and_round_trips(pair, batch, tmp_path):
    float_path = save_compressed(pair["float"], tmp_path / "float.dsk")
    grid_path = save_compressed(pair["int8"], tmp_path / "grid.dsk")
    extra = grid_path.stat().st_size - float_path.stat().st_size
    # same levels and indices (no fine-tuning), plus 410 float32 scales and their record headers:
    # measured 134,615 B vs 136,288 B (+1,673 B = 1,640 B of scales + 33 B of headers)
    assert SCALE_BYTES <= extra <= SCALE_BYTES + 100
    loaded = load_compressed(grid_path)
    for name, w in _weights(pair["int8"]).items():
        assert torch.equal(dict(loaded.named_parameters())[f"{name}.weight"], w)
        assert isinstance(quantized_weights(loaded)[f"{name}.weight"], GridCodebookWeight)
    with torch.no_grad():
        assert torch.equal(loaded(batch), pair["int8"](batch))
    again = save_compressed(loaded, tmp_path / "again.dsk")
    assert again.read_bytes() == grid_path.read_bytes()


def test_dsk_missing_or_bad_scales_is_refused(pair, tmp_path):
    path = save_compressed(pair["int8"], tmp_path / "grid.dsk")
    tensors, meta = read_container(path)
    broken = dict(tensors)
    broken["classifier.weight#scale"] = tensors["classifier.weight#scale"][:5]
    write_container(tmp_path / "short.dsk", [record_for(n, t) for n, t in broken.items()], meta)
    with pytest.raises(ArtifactError, match=r"'classifier.weight': scale must be 10 positive float32 values"):
        load_compressed(tmp_path / "short.dsk")
    del broken["classifier.weight#scale"]
    write_container(tmp_path / "none.dsk", [record_for(n, t) for n, t in broken.items()], meta)
    with pytest.raises(ArtifactError, match=r"needs records classifier.weight#levels and classifier.weight#scale"):
        load_compressed(tmp_path / "none.dsk")


def test_accuracy_matches_the_float_codebook(digits, trained):
    # measured on the 359 test images: 87.19 % both at 4 bits, 86.63 % (float) vs 86.91 % (int8) at 5
    test = digits.loader("test", batch_size=500)
    for bits in (4, 5):
        acc = {grid: accuracy(deepshrink.quantize(copy.deepcopy(trained), Codebook(bits=bits, grid=grid), data=None), test)
               for grid in ("float", "int8")}
        assert abs(acc["int8"] - acc["float"]) <= 2 / len(digits.test)


def test_fine_tuning_keeps_every_step_on_the_grid(digits, trained, pair):
    tuned = deepshrink.quantize(copy.deepcopy(trained), Codebook(bits=4, grid="int8",
                                                                 train=TrainConfig(epochs=1, lr=1e-3, seed=0)),
                                data=digits)
    for name, w in _weights(tuned).items():
        qw = quantized_weights(tuned)[f"{name}.weight"]
        start = quantized_weights(pair["int8"])[f"{name}.weight"]
        assert torch.equal(qw.scale, start.scale) and torch.equal(qw.indices, start.indices)   # fixed in training
        assert not torch.equal(qw.codebook, start.codebook)                                  # the levels trained
        assert torch.equal(qw.int8_weight().float() * qw.scale[:, None], w)
    runtime = deepshrink.quantize(copy.deepcopy(tuned), Int8DynamicLowBit(bits=8, group_size=None), data=None)
    assert torch.equal(runtime.hidden[0].dequantized_weight(), tuned.hidden[0].weight)


def test_straight_through_gradient_skips_channels_where_a_level_is_clipped():
    codebook = torch.tensor([-1.0, 0.3, 2.2], requires_grad=True)
    scale = torch.tensor([1.0 / 127, 4.0 / 127])          # channel 0 spans +-1, channel 1 +-4
    indices = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 2]], dtype=torch.uint8)
    w = _DecodeOnGrid.apply(codebook, scale, indices, None)
    assert torch.equal(w, decode_on_grid(codebook.detach(), scale, indices))
    assert torch.equal(snap_to_grid(codebook.detach(), scale), torch.tensor([[-127, 38, 127], [-32, 10, 70]],
                                                                           dtype=torch.int8))
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    w.backward(grad)
    # level 2.2 is clipped (279.4 steps -> 127) in channel 0, so only channel 1's 30 + 40 reach it
    assert codebook.grad.tolist() == [11.0, 22.0, 70.0]


def test_pruned_weights_stay_zero_on_the_grid(trained):
    model = copy.deepcopy(trained)
    w = model.hidden[1].weight
    mask = (torch.arange(w.numel()) % 3 != 0).reshape(w.shape)
    with torch.no_grad():
        w.mul_(mask)
    pruned = w.detach().clone()
    deepshrink.quantize(model, Codebook(bits=3, grid="int8"), data=None)
    qw = quantized_weights(model)["hidden.1.weight"]
    assert torch.equal(qw.mask, mask) and bool((model.hidden[1].weight[~mask] == 0).all())
    assert bool((qw.int8_weight()[~mask] == 0).all())
    assert torch.equal(qw.scale, grid_scales(pruned, mask=mask))
