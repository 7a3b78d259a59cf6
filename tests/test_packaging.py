"""What a user of any Python package expects: --version, -q, one-line errors, a library that
configures nothing on import (logging, warnings, matplotlib's backend)."""
import importlib.metadata
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from deepshrink.cli import main

VERSION = importlib.metadata.version("deepshrink")


def run(*args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_version_of_python_dash_m_is_the_installed_metadata():
    result = run(sys.executable, "-m", "deepshrink", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"deepshrink {VERSION}"

    import deepshrink

    assert deepshrink.__version__ == VERSION


def test_version_of_the_console_script():
    script = Path(sys.executable).with_name("deepshrink")
    if not script.exists():
        pytest.skip("no console script beside this interpreter (not installed with pip)")
    result = run(str(script), "--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"deepshrink {VERSION}")


@pytest.mark.parametrize("flag, value, minimum", [
    ("--threads", "0", 1), ("--runs", "0", 1), ("--warmup", "-1", 0), ("--image-size", "0", 1),
])
def test_an_out_of_range_flag_is_one_line_and_exit_2(tmp_path, flag, value, minimum):
    result = run(sys.executable, "-m", "deepshrink", "evaluate", str(tmp_path / "m.pte"), "--data", "digits", flag, value)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"deepshrink: error: argument {flag}: must be at least {minimum}, got {value}")


def test_quiet_drops_the_progress_lines_and_keeps_nothing_behind(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: tiny\nmodel: seed-mlp\ndata: {name: digits}\nstages:\n  - train: {epochs: 1}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "[1/1] train" in err and "finished tiny in" in err

    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""
    assert main(["run", str(recipe), "--out", str(tmp_path / "c"), "--quiet"]) == 0  # after the command too
    assert capsys.readouterr().err == ""

    # the command's handler and levels lived for that command only
    logger = logging.getLogger("deepshrink")
    assert (logger.handlers, logger.level, logger.propagate) == ([], logging.NOTSET, True)


IMPORT_STATE = """
import logging, sys, warnings
import torch
import matplotlib
matplotlib.use("svg")
filters, root = list(warnings.filters), (logging.root.level, list(logging.root.handlers))
import deepshrink
import deepshrink.cli, deepshrink.deploy, deepshrink.evaluation, deepshrink.pipeline, deepshrink.report
from deepshrink.report.plots import accuracy_vs_size
assert accuracy_vs_size({"m.pte": {"accuracy": 0.9, "file_bytes": 2048}}).startswith("data:image/png;base64,")
handlers = [h for h in logging.getLogger("deepshrink").handlers if not isinstance(h, logging.NullHandler)]
print(handlers, logging.getLogger("deepshrink").level, (logging.root.level, logging.root.handlers) == root,
      warnings.filters == filters, matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_importing_deepshrink_configures_nothing():
    result = run(sys.executable, "-c", IMPORT_STATE, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # no handler, no level, root logger and warning filters untouched, the user's backend kept, no pyplot
    assert result.stdout.split("\n")[-2] == "[] 0 True True svg False"


def test_onnx_export_restores_the_exporters_log_level(tmp_path):
    import torch
    from torch import nn

    from deepshrink.deploy.lowering import to_onnx

    exporter = logging.getLogger("torch.onnx")
    before = exporter.level
    exporter.setLevel(logging.INFO)
    try:
        program = torch.export.export(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
        to_onnx(program, tmp_path / "m.onnx")
        assert (tmp_path / "m.onnx").stat().st_size > 0
        assert exporter.level == logging.INFO
    finally:
        exporter.setLevel(before)
