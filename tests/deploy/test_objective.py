"""objective: latency|balanced — int8 or fp32 per layer, decided by times measured in the runtime.

Times vary between runs, so these tests assert what holds whatever the machine: the choice is the
fastest (latency) or the smallest as fast (balanced) of the files measured, every layer is
measured and recorded, the chosen model is what the record says, and bad input is refused."""
import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.core.targets import get_target
from deepshrink.data import load
from deepshrink.deploy.objective import TIE, choose_by_latency, quantizable_layers
from deepshrink.models import create
from deepshrink.pipeline import parse_recipe
from deepshrink.quantization import Int8QAT, Int8Static, quantize


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = load("digits")
    model = create("seed-mlp").eval()

    def run(m, config):
        return quantize(m, config, data=data, target="xnnpack")
    return model, data, run


@pytest.mark.parametrize("objective", ["latency", "balanced"])
def test_the_choice_is_the_fastest_or_the_smallest_as_fast_of_what_was_measured(setup, objective):
    model, data, run = setup
    chosen, record = choose_by_latency(model, Int8Static(calibration_samples=32), run, example_input=data.example_input(8),
                                       target=get_target("xnnpack"), objective=objective, runs=50, warmup=5)
    files = record["files"]
    assert {"fp32", "int8"} <= set(files) and record["chosen"] in files
    assert [d["layer"] for d in record["per_layer"]] == quantizable_layers(model) == ["hidden.0", "classifier"]
    fastest = min(f["latency_ms_median"] for f in files.values())
    if objective == "latency":   # never slower than the fp32 file measured in the same run
        assert files[record["chosen"]]["latency_ms_median"] == fastest <= files["fp32"]["latency_ms_median"]
    else:
        as_fast = [k for k, f in files.items() if f["latency_ms_median"] <= (1 + TIE) * fastest]
        assert record["chosen"] == min(as_fast, key=lambda k: files[k]["file_bytes"])
    quantized = getattr(chosen, "_deepshrink_quant", None)
    assert (quantized is None) == (record["chosen"] == "fp32")
    if quantized is not None:
        assert list(quantized["config"]["fp32_layers"]) == record["fp32_layers"]


def test_size_measures_nothing_and_qat_is_refused(setup):
    model, data, run = setup
    _, record = choose_by_latency(model, Int8Static(calibration_samples=32), run, example_input=data.example_input(8),
                                  target=get_target("xnnpack"), objective="size")
    assert record == {"objective": "size"}
    with pytest.raises(ConfigError, match="post-training int8 only, not Int8QAT"):
        choose_by_latency(model, Int8QAT(), run, example_input=data.example_input(8), target=get_target("xnnpack"),
                          objective="latency")


def test_a_recipe_objective_needs_a_post_training_int8_stage():
    with pytest.raises(ConfigError, match="objective: latency chooses per layer .* has none"):
        parse_recipe({"name": "r", "model": "seed-mlp", "data": {"name": "digits"}, "objective": "latency",
                      "stages": [{"train": {"epochs": 1}}]})
    with pytest.raises(ConfigError, match="objective"):
        parse_recipe({"name": "r", "model": "seed-mlp", "data": {"name": "digits"}, "objective": "fastest",
                      "stages": [{"quantize": {"scheme": "int8-static"}}]})
    recipe = parse_recipe({"name": "r", "model": "seed-mlp", "data": {"name": "digits"}, "objective": "balanced",
                           "stages": [{"quantize": {"scheme": "int8-static"}}]})
    assert recipe.objective == "balanced" and recipe.as_dict()["objective"] == "balanced"
    plain = parse_recipe({"name": "r", "model": "seed-mlp", "data": {"name": "digits"}, "stages": [{"quantize": {"scheme": "int8-static"}}]})
    assert "objective" not in plain.as_dict()   # the fingerprints of recipes written before stay the same
