"""One interface over the runtimes: eager PyTorch, ExecuTorch ``.pte``, ONNX Runtime ``.onnx``.

Runtimes are imported inside the runner that needs them, so ``import deepshrink`` stays cheap.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import ArtifactError, ConfigError, DataError, ModelLoadError
from deepshrink.core.extras import require
from deepshrink.core.outputs import output_tensors
from deepshrink.evaluation.input_meta import ORT_DTYPES, check_inputs, program_inputs, pte_inputs, shape_mismatch
from deepshrink.evaluation.isolation import probe, runtime_reason
from deepshrink.evaluation.verify import check_onnx, check_pte, read_artifact, uses_external_data


class Runner:
    """``predict_all(inputs)``: every output tensor of a batch; ``predict``: the first (logits,
    embeddings). ``inputs`` is a ``core.samples`` batch: a tensor, a tuple or a dict of tensors."""

    runtime = "?"
    max_batch: int | None = None   # a file planned for a fixed or bounded batch is fed in chunks of it
    static_batch = False           # it runs exactly max_batch samples a call: a short last chunk is padded
    # what the file says it takes, per input: (sizes, dtype name); a size of None varies
    inputs: list[tuple[tuple[int | None, ...], str | None] | None] | None = None

    def predict_all(self, x) -> tuple[torch.Tensor, ...]:
        n, step = S.batch_size(x), self.max_batch or S.batch_size(x)
        if n == step or (n < step and not self.static_batch):
            return self._execute(x)
        chunks = []
        for start in range(0, n, step):
            chunk, real = S.take(x, start, start + step), min(step, n - start)
            if real < step:   # repeat the last sample up to the file's batch; its outputs are dropped
                chunk = S.map_tensors(lambda t: torch.cat([t, t[-1:].expand(step - real, *t.shape[1:])]), chunk)
            chunks.append(tuple(o[:real] if o.dim() and o.shape[0] == step else o for o in self._execute(chunk)))
        return tuple(torch.cat(c) for c in zip(*chunks))

    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def predict(self, x) -> torch.Tensor:
        return self.predict_all(x)[0]

    def call_for(self, x) -> Callable[[], object]:
        """A call with no arguments that runs the batch ``x`` through the runtime and nothing else:
        what latency times. ``x`` is checked and converted once, as an app holding its input
        buffers does, so a sub-10 µs model is not measured as our own checks."""
        self.predict_all(x)   # a bad input fails here, with the runner's message
        return lambda: self.predict_all(x)


class EagerRunner(Runner):
    runtime = "pytorch"
    ran = False   # after one call succeeded, a failure is the model's, not a shape the data brings

    def __init__(self, model: nn.Module, threads: int = 1) -> None:
        self.model, self.threads, self.path = model, threads, None
        try:
            model.eval()
        except NotImplementedError:
            pass

    @torch.no_grad()
    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        if self.inputs is not None:   # a .pt2 program: its guards would fail with an assertion
            check_inputs(self.path, S.flatten(x), self.inputs, planned=False)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            outputs = output_tensors(S.call(self.model, x))
            self.ran = True
            return outputs
        except (RuntimeError, TypeError, IndexError) as err:
            if self.ran:
                raise
            # the first call is where a model meets the data: a shape that does not fit is the data's fault
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = f"{self.path}: " if self.path else ""
            raise DataError(f"{where}model and data do not fit: {type(self.model).__name__} cannot run a batch of "
                            f"{[list(s) for s in S.shapes(x)] if not isinstance(x, torch.Tensor) else list(x.shape)}: "
                            f"{type(err).__name__}: {first}; evaluate it on data of the shape it was trained on "
                            "(the CLI's --image-size sets the image side)") from None
        except SystemExit as err:   # the model's own code called sys.exit(): an error, not the end of the run
            raise ModelLoadError(f"model: {type(self.model).__name__}.forward called sys.exit({err.code!r}); "
                                 "a model must raise an exception instead") from None
        finally:
            torch.set_num_threads(previous)

    def call_for(self, x) -> Callable[[], object]:
        """The model called as a PyTorch user serves it: under ``inference_mode``, at ``threads``
        (set for the process by the caller of ``call_for``: ``timing_threads``)."""
        self.predict_all(x)
        model = self.model

        @torch.inference_mode()
        def call():
            return S.call(model, x)
        return call


class PteRunner(Runner):
    """An ExecuTorch program. Its bytes are checked (``verify.check_pte``) before the runtime sees
    them; ``isolate`` first loads and runs it once in a child process (``isolation.probe``), so a
    file that crashes the runtime is an ``ArtifactError`` instead of the end of this process."""

    runtime = "executorch"

    def __init__(self, path: str | os.PathLike, threads: int = 1, *, isolate: bool = False) -> None:
        require("executorch")
        # registers ExecuTorch's quantized kernels (embedding_byte / embedding_4bit of an int8 or
        # 4-bit embedding table) with the runtime: without it such a program loads only in the
        # process that exported it
        import executorch.kernels.quantized  # noqa: F401
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        self.path, self.threads = Path(path), threads
        # the program reads these bytes for as long as it lives: they are kept with it
        self.data = read_artifact(path)
        check_pte(self.data, path)
        if isolate:
            probe("pte", self.data, path)
        log = io.StringIO()
        with contextlib.redirect_stderr(log):   # the runtime logs its CPU probing there: not the user's concern
            _unsafe_reset_threadpool(threads)
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):   # the runtime logs why through Python's sys.stderr
                # the method borrows from the program: keep both alive (a freed program makes execute crash)
                self.program = Runtime.get().load_program(self.data)
                self.method = self.program.load_method("forward")
        except Exception as err:  # the runtime raises RuntimeError/ValueError for bad programs
            raise ArtifactError(f"{path}: ExecuTorch could not load this program: "
                                f"{runtime_reason(log.getvalue(), str(err))}") from None
        self.inputs = pte_inputs(self.method.metadata)
        first = self.inputs[0] if self.inputs else None
        # the memory plan bounds the batch; lowering may tighten the bound we exported with
        self.max_batch = int(first[0][0]) if first and first[0] else None

    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        tensors = [t.contiguous() for t in S.flatten(x)]
        check_inputs(self.path, tensors, self.inputs, planned=True)
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):
                return tuple(self.method.execute(tensors))
        except RuntimeError as err:
            wrong = shape_mismatch(tensors, self.inputs)
            if wrong:
                raise DataError(f"{self.path}: {wrong}; the program runs only inputs of the shapes it was exported "
                                "with (the CLI's --image-size sets the image side)") from None
            raise ArtifactError(f"{self.path}: ExecuTorch failed running this program on inputs "
                                f"{[list(t.shape) for t in tensors]}: {runtime_reason(log.getvalue(), str(err))}") from None

    def call_for(self, x) -> Callable[[], object]:
        """``Method.execute`` on tensors checked once (the program's call, as an app makes it)."""
        if self.max_batch is not None and S.batch_size(x) > self.max_batch:
            return super().call_for(x)   # fed in chunks of the planned batch: timed as it runs
        self.predict_all(x)
        tensors = [t.contiguous() for t in S.flatten(x)]
        # through self: the program and the bytes it reads must outlive the method (a freed program crashes execute)
        return lambda: self.method.execute(tensors)


class OnnxRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int = 1, *, isolate: bool = False) -> None:
        """``isolate``: load and run it once in a child process first (see ``PteRunner``)."""
        require("onnxruntime")
        import onnxruntime as ort

        self.path, self.threads = Path(path), threads
        data = read_artifact(path)
        external = uses_external_data(check_onnx(data, path))
        if isolate and not external:
            probe("onnx", data, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            # the bytes checked are the bytes loaded; weights stored beside the model need its path
            self.session = ort.InferenceSession(str(path) if external else data, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types
            raise ArtifactError(f"{path}: ONNX Runtime could not load this model ({' '.join(str(err).split())[:300]})") from None
        described = self.session.get_inputs()
        self.input_names = [i.name for i in described]
        self.input_types = [i.type for i in described]
        self.inputs = [(tuple(d if isinstance(d, int) else None for d in (i.shape or [])), ORT_DTYPES.get(i.type))
                       for i in described]
        first = self.inputs[0][0] if self.inputs else ()
        self.max_batch = first[0] if first and first[0] is not None else None   # exported with a static batch
        self.static_batch = self.max_batch is not None

    def feeds(self, x) -> dict:
        """ONNX inputs by name, each in its own dtype (int64 token ids stay int64)."""
        tensors = S.flatten(x)
        names = S.names(x) if isinstance(x, dict) else None
        if names is not None and set(self.input_names) <= set(names):
            # the exporter drops inputs the graph never reads (an unused mask): feed by name
            chosen = [tensors[names.index(n)] for n in self.input_names]
        elif len(tensors) == len(self.input_names):
            chosen = tensors
        else:
            raise ArtifactError(f"{self.path}: the model takes inputs {', '.join(self.input_names)} but "
                                f"{len(tensors)} tensors were given")
        check_inputs(self.path, chosen, self.inputs, planned=False, names=self.input_names)
        out = {}
        for name, kind, t in zip(self.input_names, self.input_types, chosen):
            array = t.detach().contiguous().numpy()
            if kind == "tensor(float)" and array.dtype != np.float32:
                array = array.astype(np.float32)
            out[name] = array
        return out

    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        feeds = self.feeds(x)
        try:
            return tuple(torch.from_numpy(o) for o in self.session.run(None, feeds))
        except Exception as err:  # ORT raises its own exception types
            raise ArtifactError(f"{self.path}: ONNX Runtime failed running this model on inputs "
                                f"{[list(a.shape) for a in feeds.values()]}: {' '.join(str(err).split())[:300]}") from None

    def call_for(self, x) -> Callable[[], object]:
        """``run_with_iobinding`` on inputs and outputs bound once: ONNX Runtime's own call for
        repeated inference (``run`` converts every feed and allocates every output per call)."""
        import onnxruntime as ort

        if self.static_batch and S.batch_size(x) != self.max_batch:
            return super().call_for(x)   # fed in padded chunks: timed as it runs
        feeds = self.feeds(x)
        outputs = self._execute(x)   # their shapes and dtypes, and a bad input fails here
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        buffers = [o.numpy().copy() for o in outputs]   # kept alive with the binding
        for described, buffer in zip(self.session.get_outputs(), buffers):
            binding.bind_ortvalue_output(described.name, ort.OrtValue.ortvalue_from_numpy(buffer))
        session = self.session

        def call():
            session.run_with_iobinding(binding)
            return buffers
        return call


RUNTIME_SUFFIXES = {".pte": "ExecuTorch", ".onnx": "ONNX Runtime"}
CHECKPOINT_SUFFIXES = {".safetensors": "eager PyTorch", ".dsk": "eager PyTorch", ".pt2": "eager PyTorch"}


def supported_formats() -> str:
    return ", ".join(f"{s} ({r})" for s, r in {**RUNTIME_SUFFIXES, **CHECKPOINT_SUFFIXES}.items())


def open_runner(artifact: nn.Module | str | os.PathLike, *, threads: int = 1, code: str | None = None,
                isolate: bool = False):
    """The runner for a module, a ``.pte``, an ``.onnx``, or a checkpoint (loaded eagerly; ``code``
    names the ``file.py:NAME`` that rebuilds a checkpoint of your own model). ``isolate``: load a
    ``.pte`` / ``.onnx`` once in a child process first, so a file that crashes its runtime cannot
    take this process down (for files from elsewhere; the CLI's ``evaluate`` always does)."""
    if code is not None:
        from deepshrink.core.userfile import is_spec

        if not is_spec(code):
            raise ConfigError(f"model code {code!r} is not path/to/file.py:NAME (CLI: --model-code path/to/file.py:NAME)")
    if isinstance(artifact, nn.Module):
        return EagerRunner(artifact, threads)
    path = Path(artifact)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.suffix == ".pte":
        return PteRunner(path, threads, isolate=isolate)
    if path.suffix == ".onnx":
        return OnnxRunner(path, threads, isolate=isolate)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        from deepshrink.models.loading import unsupported_suffix

        raise ArtifactError(f"{path}: {unsupported_suffix(path.suffix)}; deepshrink evaluates {supported_formats()}")
    from deepshrink.models.loading import load_checkpoint

    model = load_checkpoint(path, code=code)
    runner = EagerRunner(model, threads)
    runner.path = path
    if path.suffix == ".pt2":
        runner.inputs = program_inputs(model)
        first = runner.inputs[0][0] if runner.inputs and runner.inputs[0] else ()
        if first and first[0] is not None:   # exported at one batch size: it runs that batch only
            runner.max_batch, runner.static_batch = first[0], True
    if path.suffix == ".dsk":
        _apply_sparse_decisions(model, path)
        runner.runtime = "pytorch (.dsk)"
    return runner


def _apply_sparse_decisions(model: nn.Module, path: Path) -> None:
    """Run sparse the layers that export measured faster sparse (recorded in the sidecar)."""
    from deepshrink.formats.sparse_compute import CsrLinear
    from deepshrink.formats.sidecar import read_sidecar, sidecar_path

    for decision in (read_sidecar(path) or {}).get("sparse_compute") or []:
        if decision["runs_sparse"]:
            parent_name, _, child = decision["layer"].rpartition(".")
            try:
                parent = model.get_submodule(parent_name) if parent_name else model
                dense = getattr(parent, child)
            except AttributeError:
                dense = None
            if not isinstance(dense, nn.Linear):
                raise ArtifactError(f"{sidecar_path(path)}: 'sparse_compute' names layer {decision['layer']!r:.80}, which is "
                                    "not a Linear layer of the model in the file; delete the sidecar or export the model again")
            setattr(parent, child, CsrLinear(dense.weight, dense.bias))
