"""Load a runtime file once in a child process first, so a file that crashes the runtime cannot
take this process down.

ExecuTorch and ONNX Runtime are native code: a corrupted program can abort (``SIGABRT``) or
segfault inside them, which no ``try`` catches. ``probe(kind, data, where)`` hands the bytes to a
worker process (``_probe_worker.py``) that loads the file and runs it once on zeros; a crash or
a hang there becomes an ``ArtifactError`` here, and only a file that loaded cleanly is then
loaded in-process from the same bytes. The worker starts on the first probe and serves the
following ones (a crash costs one restart); it exits when this process does.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from deepshrink.core.errors import ArtifactError

WORKER = Path(__file__).with_name("_probe_worker.py")
DEFAULT_TIMEOUT_S = 120.0   # the first probe of a kind includes importing its runtime (seconds on a busy CPU)
RUNTIMES = {"pte": ("ExecuTorch", "program"), "onnx": ("ONNX Runtime", "model")}

_lock = threading.Lock()
_worker: "_Worker | None" = None


class ProbeCrashed(ArtifactError):
    """The runtime crashed (a signal) on the file; the worker was replaced."""


class ProbeHung(ProbeCrashed):
    """The runtime did not finish loading and running the file in time; the worker was killed."""


class _Worker:
    def __init__(self) -> None:
        self.scratch = tempfile.TemporaryDirectory(prefix="deepshrink-probe-")
        self.stderr = open(Path(self.scratch.name) / "stderr", "w+b")
        # the worker's runtimes use one thread: a probe only has to reach the kernels once
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, env=env, start_new_session=True)
        self.pending = b""
        self.stderr_start = 0

    def ask(self, kind: str, data: bytes, timeout_s: float) -> dict:
        """The worker's reply; ``TimeoutError`` if none within ``timeout_s``, ``EOFError`` if it died."""
        path = Path(self.scratch.name) / f"probe.{kind}"
        path.write_bytes(data)   # the bytes checked here are the bytes the caller loads next
        self.stderr_start = self.stderr.seek(0, os.SEEK_END)
        try:
            self.process.stdin.write((json.dumps({"kind": kind, "path": str(path)}) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise EOFError from None
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError
                self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        path.unlink(missing_ok=True)
        return json.loads(line)

    def stderr_tail(self) -> str:
        """The last line the worker wrote to stderr since the current request (an abort's reason)."""
        self.stderr.flush()
        self.stderr.seek(self.stderr_start)
        lines = [l.strip() for l in self.stderr.read().decode("utf-8", "replace").splitlines() if l.strip()]
        return lines[-1][:300] if lines else ""

    def close(self) -> None:
        try:
            self.process.stdin.close()   # the worker's loop ends at EOF
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process.stdout.close()
        self.stderr.close()
        self.scratch.cleanup()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def probe(kind: str, data: bytes, where: str | os.PathLike, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Load ``data`` (a ``.pte`` or ``.onnx`` file's bytes) in the worker and run it once on zeros.

    Returns what the runtime reports about the inputs (``{"inputs": [{"sizes", "dtype"}], ...}``).
    ``ArtifactError`` if the runtime refuses the file; ``ProbeCrashed`` if it crashed, ``ProbeHung`` if it hung."""
    global _worker
    runtime, noun = RUNTIMES[kind]
    with _lock:
        if _worker is None or _worker.process.poll() is not None:
            if _worker is not None:
                _worker.close()
            try:
                _worker = _Worker()
            except OSError as err:   # no interpreter to start (an embedded Python): say so, do not load unchecked
                _worker = None
                raise ArtifactError(f"{where}: cannot start the process that checks {runtime} files first "
                                    f"({err.strerror or err}); load it with isolate=False if you trust it") from None
        worker = _worker
        try:
            reply = worker.ask(kind, data, timeout_s)
        except TimeoutError:
            worker.kill()
            worker.close()
            _worker = None
            raise ProbeHung(f"{where}: {runtime} did not finish loading this {noun} within {timeout_s:g} s; the file "
                            "is corrupted (or this machine is overloaded): export it again") from None
        except EOFError:
            code = worker.process.wait()
            reason = worker.stderr_tail()
            worker.close()
            _worker = None
            raise ProbeCrashed(f"{where}: {runtime} crashed loading this {noun} ({_describe_exit(code)}"
                               f"{': ' + reason if reason else ''}); the file is corrupted: export it again") from None
    if not reply.get("ok"):
        raise ArtifactError(f"{where}: {runtime} could not load this {noun}: {runtime_reason(reply.get('log', ''), reply.get('error', ''))}")
    return reply


def runtime_reason(log: str, error: str) -> str:
    """One line: what the runtime logged about the failure (ExecuTorch's ``[file.cpp:N] why``),
    else its exception's text."""
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    # the first logged line names the fault; later ones trace the calls that failed because of it
    why = lines[0].split("] ", 1)[-1] if lines else ""
    error = " ".join(error.split())
    if why and error:
        return f"{why[:300]} ({error[:200]})"
    return (why or error or "no reason given")[:400]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@atexit.register
def shutdown() -> None:
    """Stop the worker (it also exits by itself when this process ends)."""
    global _worker
    with _lock:
        if _worker is not None:
            _worker.close()
            _worker = None
