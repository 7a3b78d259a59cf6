import pytest

from deepshrink.core.errors import ConfigError
from deepshrink.pipeline import load_recipe, parse_recipe
from deepshrink.pipeline.recipe import packaged_recipe
from deepshrink.pruning import MagnitudePruning
from deepshrink.quantization import Int8Static


def base(**overrides):
    raw = {"name": "t", "model": "lenet-5", "data": {"name": "digits"}, "stages": [{"train": {"epochs": 1}}]}
    raw.update(overrides)
    return raw


def test_demo_recipe_is_valid_and_round_trips():
    recipe = load_recipe(packaged_recipe("demo"))
    assert [s.kind for s in recipe.stages] == ["train", "prune", "finetune", "quantize", "export", "evaluate", "report"]
    assert recipe.stages[1].config.pruning == MagnitudePruning(sparsity=0.8, scope="global")
    assert isinstance(recipe.stages[3].config, Int8Static)
    assert parse_recipe(recipe.as_dict()) == recipe
    assert parse_recipe(recipe.as_dict()).fingerprint() == recipe.fingerprint()


PACKAGED = sorted(p.stem for p in packaged_recipe("demo").parent.glob("*.yaml"))


@pytest.mark.parametrize("name", PACKAGED)
def test_every_packaged_recipe_is_valid_and_round_trips(name):
    recipe = load_recipe(packaged_recipe(name))
    assert recipe.name == name
    assert parse_recipe(recipe.as_dict()) == recipe


def test_packaged_recipes_are_the_documented_ones():
    assert PACKAGED == ["deep-compression-lenet-300-100", "deep-compression-lenet-5", "demo",
                        "sparse-vd-lenet-300-100", "sparse-vd-lenet-5"]


@pytest.mark.parametrize("raw, message", [
    (base(modle="x"), r"^recipe\.modle: unknown key; allowed keys: name, model, model_args, data, target, seed, outputs, objective, stages; did you mean 'model'\?$"),
    (base(target="tpu"), r"^target: 'tpu' is not allowed; choose one of 'xnnpack', 'onnxruntime'$"),
    (base(stages=[]), r"^stages: required"),
    (base(stages=[{"trian": {}}]), r"^stages\[0\]\.trian: unknown stage; allowed stages: train, load, prune"),
    (base(stages=[{"prune": {"method": "magnitude", "sparsity": 1.5}}]), r"^stages\[0\]\.prune\.sparsity: 1\.5 is outside \[0, 1\)"),
    (base(stages=[{"prune": {"method": "lottery"}}]), r"^stages\[0\]\.prune\.method: 'lottery' is not allowed; choose one of 'magnitude', 'gradient', 'taylor', 'random'"),
    (base(stages=[{"quantize": {"scheme": "int8-static", "calibration": "kl"}}]), r"^stages\[0\]\.quantize\.calibration: 'kl' is not allowed"),
    (base(stages=[{"train": {"epochs": "ten"}}]), r"^stages\[0\]\.train\.epochs: expected an integer, got 'ten'$"),
    (base(stages=[{"export": {"formats": ["tflite"]}}]), r"^stages\[0\]\.export\.formats\[0\]: 'tflite' is not allowed; choose one of 'pte', 'onnx', 'dsk'$"),
    (base(stages=[{"quantize": {"scheme": "int8-static"}}, {"prune": {"method": "magnitude"}}]), r"^stages\[1\]\.prune: must come before quantize"),
    (base(stages=[{"report": {}}]), r"^stages\[0\]\.report: needs an evaluate stage before it$"),
    (base(data={"name": "digits", "size": 3}), r"^recipe\.data\.size: unknown key"),
    ([1, 2], r"^recipe: expected a mapping"),
])
def test_malformed_recipes_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(raw)


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstages:\n  - train: {epochs: 1\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+, column \d+"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "absent.yaml")


def test_scheduled_prune_round_trips_and_needs_retrain():
    raw = base(stages=[{"prune": {"method": "taylor", "sparsity": 0.9, "schedule": {"iterative": {"sparsities": [0.5, 0.8]}},
                                  "retrain": {"epochs": 6}}}])
    recipe = parse_recipe(raw)
    stage = recipe.stages[0].config
    assert stage.schedule.sparsities == (0.5, 0.8) and stage.retrain.epochs == 6
    assert parse_recipe(recipe.as_dict()) == recipe
    no_retrain = base(stages=[{"prune": {"method": "magnitude", "schedule": {"gradual": {"steps": 4}}}}])
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.prune\.retrain: a schedule needs retrain epochs"):
        parse_recipe(no_retrain)
    bad = base(stages=[{"prune": {"method": "magnitude", "schedule": {"cubic": {}}, "retrain": {}}}])
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.prune\.schedule\.cubic: unknown schedule; choose one of one-shot, iterative, gradual"):
        parse_recipe(bad)


def test_sensitivity_options_are_validated():
    ok = parse_recipe(base(stages=[{"prune": {"method": "magnitude", "sensitivity": {"sparsities": [0.5, 0.9]}}}]))
    assert ok.stages[0].config.sensitivity.sparsities == (0.5, 0.9)
    assert parse_recipe(ok.as_dict()) == ok
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.prune\.sensitivity\.sparsities\[0\]: 1\.0 is outside \(0, 1\)$"):
        parse_recipe(base(stages=[{"prune": {"method": "magnitude", "sensitivity": {"sparsities": [1.0]}}}]))
    with pytest.raises(ConfigError, match=r"remove overrides or sensitivity"):
        parse_recipe(base(stages=[{"prune": {"method": "magnitude", "overrides": {"fc1": 0.5}, "sensitivity": {}}}]))
