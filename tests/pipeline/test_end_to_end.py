"""The whole path on the embedded digits, small enough for CI: every stage, both runtimes."""
import json

import pytest

from deepshrink.core.cpu import cpu_info
from deepshrink.pipeline import parse_recipe, run_recipe

RECIPE = {
    "name": "e2e", "model": "lenet-5", "data": {"name": "digits"}, "target": "xnnpack", "seed": 0,
    "stages": [
        {"train": {"epochs": 4, "lr": 0.002}},
        {"prune": {"method": "magnitude", "sparsity": 0.8}},
        {"finetune": {"epochs": 1, "lr": 0.0005, "distill": {"temperature": 4.0, "alpha": 0.5}}},
        {"quantize": {"scheme": "int8-static", "calibration_samples": 128}},
        {"export": {"formats": ["pte", "onnx"]}},
        {"evaluate": {"latency_runs": 5, "warmup": 2}},
        {"report": {}},
    ],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("e2e")
    return run_recipe(parse_recipe(RECIPE), out, data=digits, progress=False, log=lambda m: None)


def test_runtimes_agree_with_the_simulated_quantized_model(run):
    v = run.state.variants
    simulated = v["compressed eager (simulated quantized)"]["accuracy"]
    assert abs(v["compressed .pte"]["accuracy"] - simulated) <= 0.005
    assert abs(v["compressed .onnx"]["accuracy"] - simulated) <= 0.005
    assert v["fp32 .pte"]["accuracy"] == pytest.approx(v["fp32 eager"]["accuracy"], abs=1 / 359)
    assert simulated > 0.9  # 10-class digits; a broken path lands near 0.1
    # one model for both files: a layout XNNPACK runs, 7-bit weights only in the channels ONNX Runtime's
    # x86 kernels would saturate without VNNI (measured on the calibration samples; the export checks its own)
    assert run.state.quantization["int8_layout"] == "s8s8-guarded"
    assert v["compressed .onnx"]["parity_passed"] and v["compressed .pte"]["parity_passed"]


def test_compressed_pte_is_at_least_3x_smaller(run):
    v = run.state.variants
    assert v["fp32 .pte"]["file_bytes"] / v["compressed .pte"]["file_bytes"] >= 3.0
    assert v["fp32 .pte"]["file_bytes"] == (run.out_dir / "fp32.pte").stat().st_size


def test_sparsity_and_counts_are_recorded(run):
    v = run.state.variants
    assert v["fp32 .onnx"]["params"] == 431_080
    # conv1 and fc2 stay dense; 80 % of conv2+fc1 (425,000 weights) go
    assert v["compressed .onnx"]["nonzero_params"] <= 431_080 - 0.8 * 425_000
    assert v["fp32 eager"]["macs"] == 2_293_000
    assert v["compressed .pte"]["macs"] == 2_293_000  # dense MACs: unstructured zeros are still multiplied


def test_metrics_json_schema_and_report(run):
    doc = json.loads(run.metrics_path.read_text())
    assert doc["schema"] == "deepshrink.metrics/1"
    assert set(doc) >= {"created", "recipe", "environment", "data", "stages", "variants", "checks", "notes"}
    assert doc["checks"]["pte_size_ratio_fp32_over_compressed"] >= 3.0
    assert [next(iter(s["stage"])) for s in doc["stages"]][:6] == ["train", "prune", "finetune", "quantize", "export", "evaluate"]
    html = run.report_path.read_text()
    assert "data:image/png;base64," in html and "compressed .pte" in html and cpu_info().model in html and ", ".join(cpu_info().features) in html
    # the shipped row: objective size (the recipe's default), the smaller of the two compressed files
    files = {label: v["file_bytes"] for label, v in doc["variants"].items() if v["role"] == "compressed" and v["file_bytes"]}
    assert doc["shipped"]["variant"] == min(files, key=files.get) and doc["shipped"]["objective"] == "size"
    assert f"<h2>Shipped: {doc['shipped']['variant']}</h2>" in html


def test_resume_skips_finished_stages(run, digits):
    logs = []
    again = run_recipe(parse_recipe(RECIPE), run.out_dir, resume=True, data=digits, progress=False, log=logs.append)
    assert logs == ["resuming e2e: stages 1-7 already done"]
    assert again.state.variants == run.state.variants


def test_interrupted_run_resumes_from_the_last_finished_stage(tmp_path, digits, monkeypatch):
    from deepshrink.core.masks import get_masks
    from deepshrink.pipeline import stages

    recipe = parse_recipe(dict(RECIPE, stages=RECIPE["stages"][:3]))
    real_finetune = stages.HANDLERS["finetune"]

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setitem(stages.HANDLERS, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path, data=digits, progress=False, log=lambda m: None)
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["completed"] == 2 and state["has_masks"]

    monkeypatch.setitem(stages.HANDLERS, "finetune", real_finetune)
    logs = []
    resumed = run_recipe(recipe, tmp_path, resume=True, data=digits, progress=False, log=logs.append)
    assert logs[0] == "resuming e2e: stages 1-2 already done"
    assert [e["index"] for e in resumed.state.log] == [0, 1, 2]
    masks = get_masks(resumed.state.model)
    # the masks came back from disk and held through fine-tuning: pruned weights are still zero
    for name, mask in masks.items():
        weight = resumed.state.model.get_submodule(name.rsplit(".", 1)[0]).weight   # as the masked module computes it
        assert (weight[~mask] == 0).all()
    assert resumed.state.log[1]["summary"]["sparsity"] == pytest.approx(0.8, abs=1e-6)


def test_pruned_float_model_as_dsk_with_sparse_compute_decisions(tmp_path, digits):
    recipe = parse_recipe({
        "name": "sparse", "model": "lenet-300-100", "data": {"name": "digits"},
        "stages": [
            {"train": {"epochs": 2}},
            {"prune": {"method": "magnitude", "sparsity": 0.95, "skip_classifier": False,
                       "schedule": {"iterative": {"sparsities": [0.8]}}, "retrain": {"epochs": 2}}},
            {"export": {"formats": ["dsk", "pte"]}},
            {"evaluate": {"latency_runs": 3, "warmup": 1}},
            {"report": {}},
        ],
    })
    result = run_recipe(recipe, tmp_path, data=digits, progress=False, log=lambda m: None)
    v = result.state.variants
    assert v["compressed .dsk"]["accuracy"] == v["compressed eager"]["accuracy"]   # lossless storage
    assert v["fp32 .pte"]["file_bytes"] / v["compressed .dsk"]["file_bytes"] > 8    # 95 % sparse, stored sparse
    assert v["compressed .dsk"]["nonzero_params"] == v["compressed eager"]["nonzero_params"]
    assert "Sparse compute, compressed .dsk" in result.report_path.read_text()
    rounds = result.state.log[1]["summary"]["rounds"]
    assert [(r["epoch"], r["sparsity"]) for r in rounds] == [(0, 0.8), (1, 0.95)]


def test_sensitivity_proposes_per_layer_sparsities_and_is_plotted(tmp_path, digits):
    recipe = parse_recipe({
        "name": "sens", "model": "lenet-300-100", "data": {"name": "digits"},
        "stages": [
            {"train": {"epochs": 2}},
            {"prune": {"method": "magnitude", "sparsity": 0.9, "skip_classifier": False,
                       "sensitivity": {"sparsities": [0.5, 0.9, 0.98]}}},
            {"evaluate": {"latency_runs": 0}},
            {"report": {}},
        ],
    })
    result = run_recipe(recipe, tmp_path, data=digits, progress=False, log=lambda m: None)
    summary = result.state.log[1]["summary"]
    proposed = summary["sensitivity"]["proposed"]
    assert set(proposed) == {"hidden.0", "hidden.1", "classifier"}
    # the proposal is what was applied, and it reaches the 90 % target over the pruned layers
    for layer, info in summary["layers"].items():
        assert info["kept"] == info["total"] - round(proposed[layer] * info["total"])
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert "sensitivity</h3><img" in result.report_path.read_text()


def test_prune_then_codebook_into_dsk(tmp_path, digits):
    recipe = parse_recipe({
        "name": "dc", "model": "lenet-300-100", "data": {"name": "digits"},
        "stages": [
            {"train": {"epochs": 2}},
            {"prune": {"method": "magnitude", "sparsity": 0.9, "skip_classifier": False}},
            {"quantize": {"scheme": "codebook", "method": "kmeans", "bits": 4}},
            {"export": {"formats": ["dsk"]}},
            {"evaluate": {"latency_runs": 0}},
        ],
    })
    result = run_recipe(recipe, tmp_path, data=digits, progress=False, log=lambda m: None)
    v = result.state.variants
    assert v["compressed .dsk"]["accuracy"] == v["compressed eager (simulated quantized)"]["accuracy"]
    # 10 % of 266,200 weights at 4-bit indices + positions, biases fp32: > 20x under dense fp32
    assert v["compressed .dsk"]["file_bytes"] * 20 < 4 * 266_610
    assert result.state.log[2]["summary"]["weights"]["hidden.0.weight"] == "CodebookWeight 4-bit"
    # the run state kept the codes: resuming after the quantize stage exports the same bytes
    first = (tmp_path / "compressed.dsk").read_bytes()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["model_file"] == "model.dsk"
    (tmp_path / "state" / "state.json").write_text(json.dumps({**state, "completed": 3}))
    run_recipe(recipe, tmp_path, resume=True, data=digits, progress=False, log=lambda m: None)
    assert (tmp_path / "compressed.dsk").read_bytes() == first


def test_accuracy_budget_stage_records_what_it_tried(tmp_path, digits):
    recipe = parse_recipe({
        "name": "budget", "model": "lenet-5", "data": {"name": "digits"},
        "stages": [
            {"train": {"epochs": 2}},
            {"quantize": {"scheme": "int8-budget", "max_drop_pt": 100.0, "ptq": {"calibration_samples": 64}}},
        ],
    })
    assert parse_recipe(recipe.as_dict()) == recipe
    logs = []
    result = run_recipe(recipe, tmp_path, data=digits, progress=False, log=logs.append)
    budget = result.state.quantization["budget"]
    assert budget["met"] is True and len(budget["steps"]) == 1   # a 100-point budget: PTQ alone is enough
    assert any(line.startswith("      budget: float accuracy") for line in logs)


def test_channel_pruning_stage_shrinks_and_resumes(tmp_path, digits):
    recipe = parse_recipe({
        "name": "channels", "model": "lenet-5", "data": {"name": "digits"},
        "stages": [
            {"train": {"epochs": 1}},
            {"prune": {"method": "channels", "ratio": 0.5, "importance": "l1", "retrain": {"epochs": 1}}},
            {"export": {"formats": ["pte"]}},
            {"evaluate": {"latency_runs": 0}},
        ],
    })
    assert parse_recipe(recipe.as_dict()) == recipe
    result = run_recipe(recipe, tmp_path, data=digits, progress=False, log=lambda m: None)
    summary = result.state.log[1]["summary"]
    assert summary["structured"]["macs_after"] * 2 < summary["structured"]["macs_before"]
    assert result.state.model.conv2.out_channels % 8 == 0 and result.state.model.conv2.out_channels < 50
    v = result.state.variants
    assert v["compressed .pte"]["macs"] == summary["structured"]["macs_after"]
    assert v["compressed .pte"]["file_bytes"] * 2 < v["fp32 .pte"]["file_bytes"]
    # the shrunk widths were recorded: the saved state rebuilds the smaller skeleton
    from deepshrink.models import load

    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    again = load(tmp_path / "state" / saved["generation"] / saved["model_file"])
    assert again.conv2.out_channels == result.state.model.conv2.out_channels


def test_variational_dropout_learns_the_sparsity_then_retrains_with_masks_held(tmp_path, digits):
    recipe = parse_recipe({
        "name": "vd", "model": "lenet-300-100", "data": {"name": "digits"},
        "stages": [
            {"train": {"epochs": 3}},
            {"prune": {"method": "variational", "skip_classifier": False, "train": {"epochs": 4, "lr": 0.002},
                       "kl_weight": 0.05,  # 1,000 digits against 266,200 weights: the full KL term would prune all
                       "retrain": {"epochs": 1, "lr": 0.0005, "distill": {"temperature": 2.0, "alpha": 0.5}},
                       "remove_dead": True}},
            {"quantize": {"scheme": "codebook", "method": "kmeans", "bits": 4}},
            {"export": {"formats": ["dsk"]}},
            {"evaluate": {"latency_runs": 0}},
        ],
    })
    result = run_recipe(recipe, tmp_path, data=digits, progress=False, log=lambda m: None)
    summary = result.state.log[1]["summary"]
    kept = sum(d["kept"] for d in summary["layers"].values())
    assert summary["sparsity"] > 0.7                      # nobody asked for a number: the KL term found it
    assert len(summary["retrain"]["val_accuracy"]) == 1
    v = result.state.variants
    assert v["compressed .dsk"]["accuracy"] == v["compressed eager (simulated quantized)"]["accuracy"]
    assert v["compressed .dsk"]["accuracy"] > 0.9
    assert v["compressed .dsk"]["nonzero_params"] <= kept + 410  # retraining revived no weight (410 biases)
    # units nothing reads any more were cut out; the .dsk rebuilds the narrower skeleton
    widths = summary["removed_dead"]
    assert widths["hidden.0"]["after"] < 300 and widths["hidden.0"]["after"] % 8 == 0
    assert v["compressed .dsk"]["params"] < 266_610
