"""In a recipe: a failed parity check stops the run (one line), or with parity: warn shows in red."""
import json

import pytest

from deepshrink.deploy.parity import ParityError
from deepshrink.pipeline import parse_recipe, run_recipe

MODEL = '''
import torch
from torch import nn

class Wrong(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return 1.5 * y + 1.0 if torch.compiler.is_exporting() else y
'''


def recipe(tmp_path, parity):
    (tmp_path / "wrong.py").write_text(MODEL)
    return parse_recipe({
        "name": "gate", "model": f"{tmp_path / 'wrong.py'}:Wrong", "data": {"name": "digits"},
        "stages": [{"train": {"epochs": 1}}, {"export": {"formats": ["onnx"], "baseline": False, "parity": parity}},
                   {"evaluate": {"latency_runs": 2, "warmup": 1}}, {"report": {}}],
    })


def test_the_run_stops_at_a_failed_parity_check(tmp_path, digits):
    with pytest.raises(ParityError, match=r"compressed\.onnx: export parity check failed in onnxruntime on this CPU"):
        run_recipe(recipe(tmp_path, "fail"), tmp_path / "out", data=digits, progress=False, log=lambda m: None)
    assert not (tmp_path / "out" / "compressed.onnx").exists()


def test_parity_warn_keeps_the_file_and_the_report_shows_it_in_red(tmp_path, digits):
    logs = []
    run = run_recipe(recipe(tmp_path, "warn"), tmp_path / "out", data=digits, progress=False, log=logs.append)
    variant = run.state.variants["compressed .onnx"]
    assert variant["parity_passed"] is False and not variant["parity"][0]["passed"]
    doc = json.loads(run.metrics_path.read_text())
    assert doc["notes"][0].startswith("PARITY FAILED: compressed .onnx in onnxruntime")
    html = run.report_path.read_text()
    assert "<span class='bad'>onnxruntime:" in html and "class=\"alarm\"" in html
    assert any("parity beyond tolerance" in line for line in logs)
