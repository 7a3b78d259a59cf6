"""A user's own model and raw inputs in a recipe: token ids of varying length, a dict output, no labels."""
import json
from pathlib import Path

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.evaluation.runners import open_runner
from deepshrink.pipeline import parse_recipe, run_recipe

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "token_model.py"
DYNAMIC = {"input_ids": {1: [2, 32]}, "attention_mask": {1: [2, 32]}}


def recipe(**overrides):
    raw = {
        "name": "tokens", "model": f"{FIXTURE}:pretrained",
        "data": {"name": "my-sentences", "calib": f"{FIXTURE}:calib", "eval": f"{FIXTURE}:evaluation"},
        "stages": [{"quantize": {"scheme": "int8-static", "calibration_samples": 48}},
                   {"export": {"formats": ["pte", "onnx"], "dynamic": DYNAMIC, "parity_samples": 40}},
                   {"evaluate": {"latency_runs": 3, "warmup": 1}}, {"report": {}}],
    }
    raw.update(overrides)
    return parse_recipe(raw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_recipe(recipe(), tmp_path_factory.mktemp("tokens"), progress=False, log=lambda m: None)


def test_every_variant_is_scored_by_fidelity_in_its_runtime(run):
    v = run.state.variants
    assert set(v) == {"fp32 eager", "compressed eager (simulated quantized)", "fp32 .pte", "fp32 .onnx",
                      "compressed .pte", "compressed .onnx"}
    for label, variant in v.items():
        assert variant["accuracy"] is None and variant["fidelity"]["kind"] == "classification", label
        assert variant["fidelity"]["samples"] == 40
    assert v["fp32 .pte"]["fidelity"]["top1_agreement"] == 1.0 and v["fp32 .onnx"]["fidelity"]["mean_kl"] < 1e-6
    for fmt in ("pte", "onnx"):
        assert v[f"compressed .{fmt}"]["fidelity"]["top1_agreement"] >= 0.9
        assert v[f"compressed .{fmt}"]["parity_passed"]
    doc = json.loads(run.metrics_path.read_text())
    assert "compressed_pte_minus_simulated_top1_agreement" in doc["checks"]
    assert "fidelity to fp32" in run.report_path.read_text()


def test_the_files_run_every_length_in_range_with_int64_inputs(run):
    for name in ("compressed.pte", "compressed.onnx", "fp32.pte"):
        runner = open_runner(run.out_dir / name)
        for length in (2, 17, 32):
            x = {"input_ids": torch.randint(0, 50, (1, length)), "attention_mask": torch.ones(1, length, dtype=torch.int64)}
            logits, hidden = runner.predict_all(x)
            assert logits.shape == (1, 6) and hidden.shape == (1, length, 32), name


def test_bad_user_data_is_one_line_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="data.eval: .*defines no 'missing'"):
        recipe(data={"calib": f"{FIXTURE}:calib", "eval": f"{FIXTURE}:missing"})
    with pytest.raises(ConfigError, match="data.name: 'my-data' is not a dataset; choose one of digits"):
        recipe(data={"name": "my-data"})
    with pytest.raises(ConfigError, match="model: 'resnet-9000' is not a zoo model"):
        recipe(model="resnet-9000")
    from deepshrink.core.errors import DataError

    with pytest.raises(DataError, match="data.eval: 'not_a_list' returned a str; return a list of samples"):
        run_recipe(recipe(data={"calib": f"{FIXTURE}:calib", "eval": f"{FIXTURE}:not_a_list"}), tmp_path,
                   progress=False, log=lambda m: None)


def test_a_fidelity_budget_without_labels_and_a_user_metric(tmp_path):
    stages = [{"quantize": {"scheme": "int8-budget", "max_drop_pt": 0.0, "max_fp32_layers": 1,
                            "ptq": {"calibration_samples": 48}, "qat": {"train": {"epochs": 1, "lr": 1e-4, "batch_size": 8}}}},
              {"export": {"formats": ["onnx"], "baseline": False}},
              {"evaluate": {"latency_runs": 2, "warmup": 1, "metric": f"{FIXTURE}:mean_logit_shift"}}]
    logs = []
    run = run_recipe(recipe(stages=stages, outputs=["logits"]), tmp_path, progress=False, log=logs.append)
    budget = run.state.quantization["budget"]
    # the float model agrees with itself: the budget is the share of answers allowed to change
    assert budget["float_accuracy"] == 1.0 and [s["action"] for s in budget["steps"]][0] == "ptq"
    assert any("budget:" in line for line in logs)
    v = run.state.variants["compressed .onnx"]
    # int8 moves the logits a little: a metric that returned a constant 0 (or was never called) fails here
    assert 0 < v["fidelity"]["user"]["mean_abs_logit_shift"] < 0.5 and v["accuracy"] is None
    assert run.state.variants["fp32 eager"]["fidelity"]["user"]["mean_abs_logit_shift"] == 0.0
    # outputs: [logits] — every file returns the logits alone
    assert len(open_runner(run.out_dir / "compressed.onnx").predict_all(
        {"input_ids": torch.randint(0, 50, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.int64)})) == 1


def test_labels_from_the_users_function_give_accuracy_beside_fidelity(tmp_path):
    stages = [{"export": {"formats": ["onnx"], "baseline": False, "dynamic": DYNAMIC}}, {"evaluate": {"latency_runs": 2}}]
    data = {"calib": f"{FIXTURE}:calib", "eval": f"{FIXTURE}:labelled_eval"}
    from deepshrink.core.errors import DataError

    with pytest.raises(DataError, match="labels: with labels for eval, give them for calib"):
        run_recipe(recipe(stages=stages, data=data), tmp_path, progress=False, log=lambda m: None)


def test_a_dynamic_range_the_model_cannot_take_is_one_line(tmp_path):
    from deepshrink.core.errors import ExportError

    stages = [{"export": {"formats": ["onnx"], "baseline": False, "dynamic": {"input_ids": {1: [2, 32]}}}}]
    with pytest.raises(ExportError, match="torch.export could not capture") as caught:
        run_recipe(recipe(stages=stages), tmp_path, progress=False, log=lambda m: None)
    assert "\n" not in str(caught.value)
    with pytest.raises(ExportError, match="export.dynamic: no input named 'ids'; the model's inputs are input_ids, attention_mask"):
        run_recipe(recipe(stages=[{"export": {"formats": ["onnx"], "dynamic": {"ids": {1: [2, 32]}}}}]), tmp_path / "b",
                   progress=False, log=lambda m: None)


def test_metrics_json_is_strict_json(run):
    text = run.metrics_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc["variants"]["fp32 eager"]["fidelity"]["top1_agreement"] == 1.0


def test_resume_rebuilds_the_users_model_from_the_recipes_own_code(run):
    logs = []
    again = run_recipe(recipe(), run.out_dir, resume=True, progress=False, log=logs.append)
    assert logs == ["resuming tokens: stages 1-4 already done"]
    assert again.state.variants == run.state.variants


def test_hidden_states_are_scored_by_cosine_similarity_in_every_stage_line(tmp_path):
    """outputs: [hidden] — [batch, seq, 32] per-token states: top-1 of an argmax over features would
    be meaningless, so the quantize stage and the budget measure cosine similarity with fp32."""
    stages = [{"quantize": {"scheme": "int8-budget", "max_drop_pt": 0.5, "ptq": {"calibration_samples": 48}}}]
    logs = []
    run = run_recipe(recipe(stages=stages, outputs=["hidden"]), tmp_path, progress=False, log=logs.append)
    line = next(m for m in logs if "simulated (PyTorch)" in m)
    score = float(line.split("cosine similarity with fp32 ")[1].rstrip("%")) / 100
    assert 0.99 < score < 1.0   # int8 changes the states a little, and it is measured
    budget = run.state.quantization["budget"]
    assert budget["float_accuracy"] == pytest.approx(1.0) and budget["met"]
    assert 0.995 <= budget["steps"][-1]["accuracy"] < 1.0   # within 0.5 pt of cosine similarity


def test_a_transformer_prune_stage_says_what_it_removed(tmp_path):
    """method: transformer on a BERT-like user model: the stage line names heads, neurons and
    parameters, and the fidelity figure is the hidden states' cosine similarity."""
    tiny = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_transformer.py"
    logs = []
    raw = recipe(model=f"{tiny}:tiny_bert", model_args={"positions": 32},
                 stages=[{"prune": {"method": "transformer", "heads": 1, "ffn": 0.5, "block_sensitivity": False}}])
    run = run_recipe(raw, tmp_path, progress=False, log=logs.append)
    line = next(m for m in logs if "prune done" in m)
    assert "heads 4->3 in 2 blocks, FFN neurons 64->32 in 2 blocks; params" in line
    assert "cosine similarity with fp32" in line
    summary = run.state.log[0]["summary"]
    assert summary["params_after"] < summary["params_before"]
