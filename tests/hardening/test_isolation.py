"""Files that crash the native runtimes end as one error line, not as the end of the process.

Two real crashes of ExecuTorch 1.5 (an abort on random bytes, a segfault on one flipped byte)
run through the console entry point in a subprocess; the probe machinery itself is checked with
stand-in workers that abort or hang on purpose.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepshrink.core.errors import ArtifactError
from deepshrink.evaluation import isolation

from .conftest import copy_of


def bare_runtime_exit(path: Path) -> int:
    """How a process that hands ``path`` straight to ExecuTorch ends (negative: killed by that signal)."""
    script = ("from executorch.runtime import Runtime\n"
              f"p = Runtime.get().load_program(open({str(path)!r}, 'rb').read())\n"
              "p.load_method('forward')\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300).returncode


def evaluate_in_a_subprocess(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepshrink", "evaluate", str(path), "--data", "digits", "--runs", "1",
                           "--warmup", "0"], capture_output=True, text=True, timeout=600)


def random_program_that_aborts(tmp_path: Path) -> Path:
    """Random bytes whose identifier is not UTF-8: the runtime's logger throws inside C++ and aborts."""
    path = tmp_path / "random.pte"
    path.write_bytes(b"\x10\x00\x00\x00\xd1\x99\xfe\xff" + bytes(range(256)) * 8)
    return path


def flipped_program_that_segfaults(valid, tmp_path: Path) -> Path:
    """One bit of the XNNPACK payload flipped (found by fuzzing): the runtime segfaults loading the method."""
    path = copy_of(valid, "pte", tmp_path, "flipped.pte")
    data = bytearray(path.read_bytes())
    data[2230] ^= 0x08
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make, signal_name", [
    (lambda valid, tmp: random_program_that_aborts(tmp), "SIGABRT"),
    (flipped_program_that_segfaults, "SIGSEGV"),
], ids=["random-bytes-abort", "bit-flip-segfault"])
def test_a_program_that_crashes_the_runtime_is_one_line_and_exit_2(make, signal_name, valid, tmp_path):
    path = make(valid, tmp_path)
    bare = bare_runtime_exit(path)
    result = evaluate_in_a_subprocess(path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"deepshrink: error: {path}: ExecuTorch "), lines
    if bare >= 0:   # a later ExecuTorch may refuse it cleanly; deepshrink's answer is one line either way
        pytest.skip(f"this ExecuTorch no longer crashes on the file (exit {bare}); still one line: {lines[0]}")
    assert bare == -getattr(__import__("signal"), signal_name)
    assert "crashed" in lines[0] or "could not load" in lines[0]


def test_the_probe_survives_the_segfault_in_process(valid, tmp_path):
    """The same file through the API, in this very process: an ArtifactError, and the next file loads."""
    from deepshrink.evaluation.runners import PteRunner

    path = flipped_program_that_segfaults(valid, tmp_path)
    with pytest.raises(ArtifactError, match=r"flipped\.pte: ExecuTorch (crashed loading this program \(signal SIGSEGV|could not)"):
        PteRunner(path, isolate=True)
    assert PteRunner(valid["pte"], isolate=True).max_batch == 1024


@pytest.fixture
def stand_in_worker(tmp_path, monkeypatch):
    """Replace the worker script by one that misbehaves; the next probe starts it."""
    def install(body: str) -> None:
        script = tmp_path / "worker.py"
        script.write_text("import os, sys, time\nfor line in sys.stdin:\n" + body)
        isolation.shutdown()
        monkeypatch.setattr(isolation, "WORKER", script)

    yield install
    isolation.shutdown()


def test_a_worker_that_aborts_is_reported_with_its_signal_and_replaced(stand_in_worker, valid, monkeypatch):
    stand_in_worker("    sys.stderr.write('terminate called after throwing an instance\\n'); sys.stderr.flush(); os.abort()\n")
    with pytest.raises(isolation.ProbeCrashed, match=r"x\.pte: ExecuTorch crashed loading this program \(signal SIGABRT: "
                                                     r"terminate called after throwing an instance\); the file is corrupted"):
        isolation.probe("pte", b"anything", "x.pte")
    monkeypatch.undo()   # the real worker again: it starts afresh and loads a good file
    reply = isolation.probe("onnx", valid["onnx"].read_bytes(), "good.onnx")
    assert reply["ok"] and reply["inputs"][0]["sizes"] == [None, 1, 28, 28]


def test_a_worker_that_hangs_is_killed_at_the_time_limit(stand_in_worker):
    stand_in_worker("    time.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(isolation.ProbeHung, match=r"y\.onnx: ONNX Runtime did not finish loading this model within 2 s"):
        isolation.probe("onnx", b"anything", "y.onnx", timeout_s=2)
    assert time.monotonic() - started < 30


def test_a_runtime_refusal_in_the_worker_keeps_the_runtimes_reason(valid, tmp_path):
    path = copy_of(valid, "pte", tmp_path, "renamed.pte")
    path.write_bytes(path.read_bytes().replace(b"forward", b"fxrward", 1))
    with pytest.raises(ArtifactError) as caught:
        isolation.probe("pte", path.read_bytes(), path)
    assert type(caught.value) is ArtifactError and "forward" in str(caught.value) and "\n" not in str(caught.value)
