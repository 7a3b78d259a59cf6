"""Resume that always works: a run killed anywhere — at a stage boundary, inside a stage, inside the
state save — continues to the numbers and the files of a run never interrupted."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from deepshrink.core.errors import ArtifactError
from deepshrink.pipeline import parse_recipe, run_recipe
from deepshrink.pipeline import stages
from deepshrink.pipeline.state import RunState, load_state, remove_leftovers, save_state

RECIPE = {
    "name": "resume", "model": "lenet-300-100", "data": {"name": "digits"}, "target": "xnnpack", "seed": 0,
    "stages": [
        {"train": {"epochs": 1}},
        {"prune": {"method": "magnitude", "sparsity": 0.8}},
        {"finetune": {"epochs": 1, "lr": 0.0005, "distill": {"temperature": 4.0, "alpha": 0.5}}},
        {"quantize": {"scheme": "int8-static", "calibration_samples": 64}},
        {"export": {"formats": ["pte", "onnx"], "baseline": False, "parity_samples": 16}},
        {"evaluate": {"latency_runs": 0}},
        {"report": {}},
    ],
}
ARTIFACTS = ("compressed.pte", "compressed.onnx")


class Killed(BaseException):
    """A kill: nothing in the run catches it, and the state of the stage it hits is never saved."""


def outcome(out, state: RunState) -> dict:
    """Everything a run produced that must not depend on where it was interrupted: each stage's
    summary (without its wall time), the measured variants, the checks of metrics.json and the bytes
    of the exported files; paths are made relative to the run's folder."""
    log = [{k: v for k, v in entry.items() if k != "seconds"} for entry in state.log]
    metrics = json.loads((out / "metrics.json").read_text())
    found = {"log": log, "exports": state.exports, "variants": state.variants,
             "metrics": {k: metrics[k] for k in ("variants", "checks")}}
    text = json.dumps(found, sort_keys=True).replace(str(out), "<out>")
    return {**json.loads(text), "files": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ARTIFACTS}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_recipe(parse_recipe(RECIPE), out, data=digits, progress=False, log=lambda m: None)
    return out, result, outcome(out, result.state)


def killed(kind: str, *, after_work: bool):
    real = stages.HANDLERS[kind]

    def handler(state, config, ctx):
        if after_work:   # the stage's work done and its files written, its state not saved yet
            real(state, config, ctx)
        raise Killed(kind)

    return handler


def test_killed_at_every_boundary_and_inside_every_stage_resumes_to_the_same_numbers_and_files(tmp_path, digits, reference, monkeypatch):
    recipe = parse_recipe(RECIPE)
    for index, stage in enumerate(recipe.stages):
        # on entering the stage (the previous one redone after its own kill, and saved), then once
        # its work is done
        for after_work in (False, True):
            logs = []
            with monkeypatch.context() as patch:
                patch.setitem(stages.HANDLERS, stage.kind, killed(stage.kind, after_work=after_work))
                with pytest.raises(Killed):
                    run_recipe(recipe, tmp_path, resume=True, data=digits, progress=False, log=logs.append)
            resumed_from = index if after_work else index - 1
            if resumed_from > 0:
                assert logs[0] == f"resuming resume: stages 1-{resumed_from} already done"
            state_file = tmp_path / "state" / "state.json"
            assert json.loads(state_file.read_text())["completed"] == index if index else not state_file.exists()
    result = run_recipe(recipe, tmp_path, resume=True, data=digits, progress=False, log=lambda m: None)
    assert outcome(tmp_path, result.state) == reference[2]
    # the quantize stage's numbers are in the comparison, and the quantized model really ran
    assert result.state.log[3]["summary"]["activation_ranges"] and result.state.variants["compressed .pte"]["accuracy"] > 0.8
    generations = [p.name for p in (tmp_path / "state").iterdir() if p.is_dir()]
    assert len(generations) == 1 and not list(tmp_path.rglob(".tmp-*"))


def test_the_saved_quantized_model_reloads_with_the_same_outputs_at_any_batch_size(reference, digits):
    out, result, _ = reference
    saved = json.loads((out / "state" / "state.json").read_text())
    assert saved["model_file"] == "model.pt2" and saved["quantization"]["int8_layout"]
    again = load_state(out / "state", parse_recipe(RECIPE).fingerprint())
    for n in (1, 7, 359):
        x = digits.example_batch(n)
        assert torch.equal(again.model(x), result.state.model(x))
    assert again.model._deepshrink_quant == saved["quantization"]


def test_a_fresh_process_resumes_after_the_quantize_stage_to_the_same_files(tmp_path, reference):
    """The CLI in a new interpreter, where nothing has registered the quantized operators yet."""
    import yaml

    out, _, expected = reference
    shutil.copytree(out / "state", tmp_path / "state")
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    # the state as it was when the run was killed inside the export stage
    saved.update(completed=4, log=saved["log"][:4], exports={}, variants={})
    (tmp_path / "state" / "state.json").write_text(json.dumps(saved))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    done = subprocess.run([sys.executable, "-m", "deepshrink.cli", "run", str(recipe), "--out", str(tmp_path), "--resume", "-q"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ARTIFACTS:
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == expected["files"][name]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    text = json.dumps({k: metrics[k] for k in ("variants", "checks")}, sort_keys=True).replace(str(tmp_path), "<out>")
    assert json.loads(text) == expected["metrics"]


# a process killed with SIGKILL while it saves a state: no except or finally of it runs
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from deepshrink.models.zoo import create
    from deepshrink.pipeline.state import RunState, save_state

    real_replace = os.replace
    def replace(src, dst):
        if Path(dst).name == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
    torch.manual_seed(1)
    save_state(RunState(model=create("lenet-5"), completed=2), Path(sys.argv[1]), "f", torch.zeros(2, 1, 28, 28))
""")


@pytest.mark.parametrize("killed_at", ["model.safetensors", "state.json"])
def test_a_kill_inside_the_state_save_leaves_the_old_state_whole_and_its_leftovers_are_removed(tmp_path, killed_at):
    from deepshrink.models.zoo import create

    torch.manual_seed(0)
    old = create("lenet-5")
    directory = tmp_path / "state"
    save_state(RunState(model=old, completed=1), directory, "f", torch.zeros(2, 1, 28, 28))
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(directory), killed_at], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    # the killed save left a generation nothing names and a half-written temporary file
    assert len([p for p in directory.iterdir() if p.is_dir()]) == 2 and list(directory.rglob(".tmp-*"))
    state = load_state(directory, "f")
    assert state.completed == 1
    for name, tensor in old.state_dict().items():
        assert torch.equal(state.model.state_dict()[name], tensor)
    # an artifact's atomic write killed the same way, 0 bytes long
    (tmp_path / ".tmp-x1y2z3-compressed.pte").write_bytes(b"")
    (directory / "train-epoch.pt").write_bytes(b"kept")  # a stage's own resume file is no leftover
    remove_leftovers(tmp_path)
    assert not list(tmp_path.rglob(".tmp-*")) and (directory / "train-epoch.pt").is_file()
    assert [p.name for p in directory.iterdir() if p.is_dir()] == [json.loads((directory / "state.json").read_text())["generation"]]
    assert load_state(directory, "f").completed == 1


def test_a_new_save_deletes_the_old_generation_only_after_naming_its_own(tmp_path, monkeypatch):
    from deepshrink.models.zoo import create
    from deepshrink.pipeline import state as state_module

    directory = tmp_path / "state"
    save_state(RunState(model=create("lenet-5"), completed=1), directory, "f", torch.zeros(2, 1, 28, 28))
    first = json.loads((directory / "state.json").read_text())["generation"]
    named_when_deleting = []
    real = state_module.shutil.rmtree
    monkeypatch.setattr(state_module.shutil, "rmtree", lambda path, **kw: (
        named_when_deleting.append(json.loads((directory / "state.json").read_text())["generation"]), real(path, **kw)))
    save_state(RunState(model=create("lenet-5"), completed=2), directory, "f", torch.zeros(2, 1, 28, 28))
    second = json.loads((directory / "state.json").read_text())["generation"]
    assert second != first and named_when_deleting == [second]
    assert sorted(p.name for p in directory.iterdir()) == [second, "state.json"]


def test_a_state_saved_before_generations_still_resumes(tmp_path):
    from deepshrink.models.zoo import create

    directory = tmp_path / "state"
    model = create("lenet-5")
    save_state(RunState(model=model, completed=3), directory, "f", torch.zeros(2, 1, 28, 28))
    saved = json.loads((directory / "state.json").read_text())
    for file in (directory / saved["generation"]).iterdir():   # the flat layout of earlier versions
        file.rename(directory / file.name)
    (directory / saved.pop("generation")).rmdir()
    (directory / "state.json").write_text(json.dumps(saved))
    remove_leftovers(tmp_path)
    state = load_state(directory, "f")
    assert state.completed == 3 and torch.equal(state.model.fc2.weight, model.fc2.weight)


def test_a_state_that_cannot_be_resumed_is_one_error_naming_the_file_and_the_way_out(tmp_path):
    from deepshrink.models.zoo import create

    directory = tmp_path / "state"
    save_state(RunState(model=create("lenet-5"), completed=1), directory, "f", torch.zeros(2, 1, 28, 28))
    saved = json.loads((directory / "state.json").read_text())
    shutil.rmtree(directory / saved["generation"])
    with pytest.raises(ArtifactError, match=r"state\.json cannot be loaded: .*model\.safetensors does not exist.*without --resume"):
        load_state(directory, "f")
    (directory / "state.json").write_text('{"fingerprint": "f", "completed": ')
    with pytest.raises(ArtifactError, match=r"state\.json cannot be loaded: not readable state JSON.*without --resume"):
        load_state(directory, "f")
    (directory / "state.json").write_text(json.dumps({**saved, "generation": "../../elsewhere"}))
    with pytest.raises(ArtifactError, match="not a folder name"):
        load_state(directory, "f")


def test_the_cli_says_a_broken_state_in_one_line_and_exits_2(tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": RECIPE["stages"][:1]}))
    (tmp_path / "out" / "state").mkdir(parents=True)
    (tmp_path / "out" / "state" / "state.json").write_text("{")
    done = subprocess.run([sys.executable, "-m", "deepshrink.cli", "run", str(recipe), "--out", str(tmp_path / "out"), "--resume"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("deepshrink: error:")]
    assert len(lines) == 1 and "state.json" in lines[0] and "without --resume" in lines[0]
