"""Bad input: one line on stderr, exit code 2 — through the real console entry point."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from deepshrink.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deepshrink.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def error_line(result):
    lines = [l for l in result.stderr.splitlines() if l.startswith("deepshrink: error:")]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_missing_data_directory(tmp_path):
    recipe = write(tmp_path, "name: x\nmodel: seed-mlp\ndata: {name: mnist}\nstages:\n  - train: {epochs: 1}\n")
    line = error_line(run_cli("run", recipe, "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "absent")))
    assert "mnist: IDX files not found" in line and "--data-dir" in line


def test_unknown_model(tmp_path, capsys):
    recipe = write(tmp_path, "name: x\nmodel: resnet-9000\nstages:\n  - train: {epochs: 1}\n")
    assert main(["run", recipe, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deepshrink: error: model: 'resnet-9000' is not a zoo model")


def test_malformed_recipe(tmp_path, capsys):
    recipe = write(tmp_path, "name: x\nstages:\n  - prune: {method: magnitude, sparsity: 2}\n")
    assert main(["validate", recipe]) == 2
    assert capsys.readouterr().err.strip() == (
        "deepshrink: error: stages[0].prune.sparsity: 2.0 is outside [0, 1); use e.g. 0.9 to prune 90 % of weights"
    )


def test_model_file_that_does_not_load(tmp_path, capsys):
    (tmp_path / "broken.pte").write_bytes(b"this is not a program")
    assert main(["evaluate", str(tmp_path / "broken.pte"), "--data", "digits"]) == 2
    assert "ExecuTorch could not load this program" in capsys.readouterr().err
    (tmp_path / "broken.onnx").write_bytes(b"nope")
    assert main(["evaluate", str(tmp_path / "broken.onnx"), "--data", "digits"]) == 2
    assert "ONNX Runtime could not load this model" in capsys.readouterr().err
    (tmp_path / "user.py").write_text("import nonexistent_module_xyz\n")
    recipe = write(tmp_path, f"name: x\nmodel: '{tmp_path / 'user.py'}:Net'\nstages:\n  - train: {{epochs: 1}}\n")
    assert main(["run", recipe, "--out", str(tmp_path / "o")]) == 2
    assert "ModuleNotFoundError" in capsys.readouterr().err


def test_validate_ok(capsys):
    from deepshrink.pipeline.recipe import packaged_recipe

    assert main(["validate", str(packaged_recipe("demo"))]) == 0
    assert "valid (7 stages" in capsys.readouterr().out


def test_evaluate_json_on_a_checkpoint(tmp_path, capsys):
    from deepshrink.models import create, save_checkpoint

    save_checkpoint(create("seed-mlp"), tmp_path / "m.safetensors")
    assert main(["evaluate", str(tmp_path / "m.safetensors"), "--data", "digits", "--json", "--runs", "3", "--warmup", "1"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["params"] == 203_530 and metrics["test_samples"] == 359
    payload = (tmp_path / "m.safetensors").read_bytes()
    assert metrics["file_bytes"] == len(payload)
    assert metrics["gzip_bytes"] == len(gzip.compress(payload, 9, mtime=0))
    assert metrics["zstd_bytes"] == len(zstandard.ZstdCompressor(level=19).compress(payload))
    assert metrics["zstd_bytes"] < metrics["file_bytes"]   # fp32 weights: the exponents compress
    assert metrics["latency_runs"] == 3


def test_a_failure_inside_the_users_model_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DEEPSHRINK_TRACEBACK", raising=False)
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Breaks(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(784, 10)\n"
        "    def forward(self, x):\n"
        "        if not self.training:\n            raise ValueError('only runs in training')\n"
        "        return self.fc(x.flatten(1))\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: breaks\nmodel: {tmp_path / 'm.py'}:Breaks\ndata: {{name: digits}}\n"
                      "stages:\n  - train: {epochs: 1}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deepshrink: failed: ValueError: only runs in training (set DEEPSHRINK_TRACEBACK=1")
    assert not any(line.startswith("Traceback") for line in err)


def test_deepshrinks_warnings_are_shown_and_third_party_ones_only_with_verbose(capsys):
    import sysconfig
    import warnings

    from deepshrink.cli import _console
    from deepshrink.pruning.structured import UnprunableLayerWarning

    library = str(Path(sysconfig.get_path("purelib")) / "somelib" / "internals.py")
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as passed_on:   # what Python itself would print
            with _console(quiet=True, verbose=verbose):
                warnings.warn("'act' (PReLU) unpruned", UnprunableLayerWarning)
                warnings.warn_explicit("somelib.old_api is deprecated", DeprecationWarning, library, 7)
                warnings.warn_explicit("your model warns", UserWarning, "/home/me/model.py", 3)
        assert capsys.readouterr().err == "deepshrink: warning: 'act' (PReLU) unpruned\n"   # ours, even with -q
        shown = [str(w.message) for w in passed_on]
        assert shown == (["somelib.old_api is deprecated"] if verbose else []) + ["your model warns"]


@pytest.mark.parametrize("module, extra", [("onnxruntime", "onnx"), ("executorch", "executorch")])
def test_a_missing_runtime_names_its_extra(tmp_path, capsys, monkeypatch, module, extra):
    suffix = ".onnx" if extra == "onnx" else ".pte"
    (tmp_path / f"m{suffix}").write_bytes(b"never read")
    monkeypatch.setitem(sys.modules, module, None)   # as if not installed
    assert main(["evaluate", str(tmp_path / f"m{suffix}"), "--data", "digits"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"deepshrink: error: {module} is not installed; it comes with the [{extra}] extra: pip install 'deepshrink[{extra}]'")


def test_the_report_plots_name_their_extra(monkeypatch):
    from deepshrink.core.extras import MissingExtraError
    from deepshrink.report.plots import accuracy_vs_size

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'deepshrink\[report\]'"):
        accuracy_vs_size({"m.pte": {"accuracy": 0.9, "file_bytes": 2048}})
