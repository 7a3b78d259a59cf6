"""Valid artifacts of tiny models, built once per session; each corpus case corrupts a copy.

A one-layer Linear model exports to a 34 KB ``.pte`` and ``.onnx`` in seconds; ``seed-mlp`` with
8 hidden units gives a 26 KB ``.safetensors`` / ``.dsk``; a ``.pt2`` is saved at a static batch of 1.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from deepshrink.cli import main


@pytest.fixture(scope="session")
def valid(tmp_path_factory) -> dict[str, Path]:
    from deepshrink.deploy import export
    from deepshrink.models import create, save_checkpoint

    root = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    x = torch.randn(4, 1, 28, 28)
    out = {"pte": root / "linear.pte", "onnx": root / "linear.onnx"}
    for path in out.values():
        export(linear, path, example_input=x)
    mlp = create("seed-mlp", hidden=[8])
    out["safetensors"], out["dsk"] = root / "mlp.safetensors", root / "mlp.dsk"
    save_checkpoint(mlp, out["safetensors"])
    save_checkpoint(mlp, out["dsk"])
    out["pt2"] = root / "static.pt2"
    torch.export.save(torch.export.export(linear, (x[:1],)), str(out["pt2"]))
    return out


def copy_of(valid: dict[str, Path], kind: str, tmp_path: Path, name: str | None = None) -> Path:
    """A copy of the valid ``kind`` file (and its sidecar) to corrupt."""
    source = valid[kind]
    target = tmp_path / (name or source.name)
    shutil.copyfile(source, target)
    sidecar = source.with_name(source.name + ".json")
    if sidecar.is_file():
        shutil.copyfile(sidecar, target.with_name(target.name + ".json"))
    return target


def cli(capsys, *args: str) -> tuple[int, list[str]]:
    """``deepshrink ARGS`` in this process: (exit code, the non-empty stderr lines)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:   # argparse's own errors
        code = exit_.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def one_error_line(code: int, lines: list[str], *fragments: str) -> str:
    """Exit code 2 and exactly one stderr line, ``deepshrink: error: ...``, holding every fragment."""
    assert code == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("deepshrink: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line
