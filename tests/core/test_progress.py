"""Progress: a bar in a terminal, periodic log lines elsewhere, nothing with -q; the long loops use it."""
from __future__ import annotations

import io
import logging

import pytest
import torch
from torch.utils.data import TensorDataset

from deepshrink.core import progress as P


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def ours():
    """The deepshrink logger as the CLI sets it (INFO), restored afterwards."""
    logger = logging.getLogger("deepshrink")
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield logger
    logger.setLevel(previous)


def test_lines_every_interval_when_not_a_terminal(monkeypatch, caplog, ours):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="deepshrink"):
        items = list(P.progress(range(4), "calibrating", every=0.0))
    assert items == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records if r.name == "deepshrink.core.progress"]
    assert [line.split(",")[0] for line in lines] == [
        "calibrating: 1/4 (25 %)", "calibrating: 2/4 (50 %)", "calibrating: 3/4 (75 %)", "calibrating: 4/4 (100 %)"]
    assert lines[1].endswith("left") and not lines[3].endswith("left")


def test_a_quick_loop_logs_nothing(monkeypatch, caplog, ours):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="deepshrink"):
        assert sum(P.progress(iter(range(100)), "fast")) == 4950      # no len(): total unknown
    assert not [r for r in caplog.records if r.name == "deepshrink.core.progress"]


def test_bar_in_a_terminal_unless_quiet(monkeypatch, ours):
    from tqdm import tqdm

    monkeypatch.setattr("sys.stderr", _Terminal())
    bar = P.progress(range(3), "epoch 1/1")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    ours.setLevel(logging.WARNING)                                   # what -q does
    quiet = P.progress(range(3), "epoch 1/1")
    assert not isinstance(quiet, tqdm) and list(quiet) == [0, 1, 2]
    quiet.set_postfix(loss="0.1")                                    # the training loop calls it either way
    assert not isinstance(P.progress(range(3), "x", enabled=False), tqdm)
    assert isinstance(P.progress(range(3), "x", enabled=True), tqdm)


def test_unconfigured_python_user_in_a_terminal_gets_a_bar(monkeypatch):
    from tqdm import tqdm

    logger = logging.getLogger("deepshrink")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert isinstance(P.progress(range(3), "x"), tqdm)


def test_disabled_is_silent_even_when_lines_are_due(monkeypatch, caplog, ours):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="deepshrink"):
        assert list(P.progress([1, 2], "x", enabled=False, every=0.0)) == [1, 2]
    assert not caplog.records


def test_long_loops_report(monkeypatch, caplog, ours):
    """Training steps, calibration and evaluation batches all go through the helper."""
    from deepshrink.data import from_datasets
    from deepshrink.evaluation.metrics import run_outputs
    from deepshrink.evaluation.runners import EagerRunner
    from deepshrink.quantization.pt2e import calibrate
    from deepshrink.training import TrainConfig, fit

    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setattr(P, "LINE_EVERY_S", 0.0)
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = from_datasets(TensorDataset(x, y), TensorDataset(x, y), num_classes=3, calib_size=32)
    model = torch.nn.Linear(4, 3)
    with caplog.at_level(logging.INFO, logger="deepshrink"):
        fit(model, data, TrainConfig(epochs=1, batch_size=16))
        calibrate(model, data, samples=32, batch_size=8)
        run_outputs(EagerRunner(model), data.batches("test", batch_size=16))
    lines = [r.getMessage() for r in caplog.records if r.name == "deepshrink.core.progress"]
    steps = len(data.loader("train", batch_size=16))
    assert steps == 4                                                  # 58 training samples, 16 a step
    assert any(line.startswith("epoch 1/1: 4/4 (100 %)") for line in lines), lines
    assert any(line.startswith("calibrating: 4/4") for line in lines), lines
    assert any(line.startswith("evaluating (pytorch): 4/4") for line in lines), lines
