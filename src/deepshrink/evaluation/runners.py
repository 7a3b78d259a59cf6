"""One interface over the runtimes: eager PyTorch, ExecuTorch ``.pte``, ONNX Runtime ``.onnx``.

Runtimes are imported inside the runner that needs them, so ``import deepshrink`` stays cheap.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import ArtifactError
from deepshrink.core.extras import require
from deepshrink.core.outputs import output_tensors


class Runner:
    """``predict_all(inputs)``: every output tensor of a batch; ``predict``: the first (logits,
    embeddings). ``inputs`` is a ``core.samples`` batch: a tensor, a tuple or a dict of tensors."""

    runtime = "?"
    max_batch: int | None = None   # a file planned for a fixed or bounded batch is fed in chunks of it

    def predict_all(self, x) -> tuple[torch.Tensor, ...]:
        n, step = S.batch_size(x), self.max_batch or S.batch_size(x)
        if n <= step:
            return self._execute(x)
        chunks = [self._execute(S.take(x, start, start + step)) for start in range(0, n, step)]
        return tuple(torch.cat(c) for c in zip(*chunks))

    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def predict(self, x) -> torch.Tensor:
        return self.predict_all(x)[0]


class EagerRunner(Runner):
    runtime = "pytorch"

    def __init__(self, model: nn.Module, threads: int = 1) -> None:
        self.model, self.threads = model, threads
        try:
            model.eval()
        except NotImplementedError:
            pass

    @torch.no_grad()
    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return output_tensors(S.call(self.model, x))
        finally:
            torch.set_num_threads(previous)


class PteRunner(Runner):
    runtime = "executorch"

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        require("executorch")
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        self.path, self.threads = Path(path), threads
        _unsafe_reset_threadpool(threads)
        try:
            # the method borrows from the program: keep both alive (a freed program makes execute crash)
            self.program = Runtime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
            # the memory plan bounds the batch; lowering may tighten the bound we exported with
            self.max_batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        except Exception as err:  # the runtime raises RuntimeError/ValueError for bad programs
            raise ArtifactError(f"{path}: ExecuTorch could not load this program ({err})") from None

    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        return tuple(self.method.execute([t.contiguous() for t in S.flatten(x)]))


class OnnxRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        require("onnxruntime")
        import onnxruntime as ort

        self.path, self.threads = Path(path), threads
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types
            raise ArtifactError(f"{path}: ONNX Runtime could not load this model ({err})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = [i.type for i in self.session.get_inputs()]
        first = self.session.get_inputs()[0].shape
        self.max_batch = first[0] if first and isinstance(first[0], int) else None   # exported with a static batch

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
        out = {}
        for name, kind, t in zip(self.input_names, self.input_types, chosen):
            array = t.detach().contiguous().numpy()
            if kind == "tensor(float)" and array.dtype != np.float32:
                array = array.astype(np.float32)
            out[name] = array
        return out

    def _execute(self, x) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(o) for o in self.session.run(None, self.feeds(x)))


def open_runner(artifact: nn.Module | str | os.PathLike, *, threads: int = 1, code: str | None = None):
    """The runner for a module, a ``.pte``, an ``.onnx``, or a checkpoint (loaded eagerly; ``code``
    names the ``file.py:NAME`` that rebuilds a checkpoint of your own model)."""
    if isinstance(artifact, nn.Module):
        return EagerRunner(artifact, threads)
    path = Path(artifact)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    if path.suffix == ".pte":
        return PteRunner(path, threads)
    if path.suffix == ".onnx":
        return OnnxRunner(path, threads)
    from deepshrink.models.loading import load_checkpoint

    model = load_checkpoint(path, code=code)
    runner = EagerRunner(model, threads)
    if path.suffix == ".dsk":
        _apply_sparse_decisions(model, path)
        runner.runtime = "pytorch (.dsk)"
    return runner


def _apply_sparse_decisions(model: nn.Module, path: Path) -> None:
    """Run sparse the layers that export measured faster sparse (recorded in the sidecar)."""
    from deepshrink.formats.sparse_compute import CsrLinear
    from deepshrink.formats.sidecar import read_sidecar

    for decision in (read_sidecar(path) or {}).get("sparse_compute") or []:
        if decision["runs_sparse"]:
            parent_name, _, child = decision["layer"].rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            dense = getattr(parent, child)
            setattr(parent, child, CsrLinear(dense.weight, dense.bias))
