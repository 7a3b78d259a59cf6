"""One interface over the runtimes: eager PyTorch, ExecuTorch ``.pte``, ONNX Runtime ``.onnx``.

Runtimes are imported inside the runner that needs them, so ``import deepshrink`` stays cheap.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepshrink.core.errors import ArtifactError


class EagerRunner:
    runtime = "pytorch"

    def __init__(self, model: nn.Module, threads: int = 1) -> None:
        self.model, self.threads = model, threads
        try:
            model.eval()
        except NotImplementedError:
            pass

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.model(x)
        finally:
            torch.set_num_threads(previous)


class PteRunner:
    runtime = "executorch"

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        self.path, self.threads = Path(path), threads
        _unsafe_reset_threadpool(threads)
        try:
            program = Runtime.get().load_program(self.path)
            self.method = program.load_method("forward")
            # the memory plan bounds the batch; lowering may tighten the bound we exported with
            self.max_batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        except Exception as err:  # the runtime raises RuntimeError/ValueError for bad programs
            raise ArtifactError(f"{path}: ExecuTorch could not load this program ({err})") from None

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        chunks = [self.method.execute([part.contiguous()])[0] for part in x.split(self.max_batch)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class OnnxRunner:
    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
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
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out)


def open_runner(artifact: nn.Module | str | os.PathLike, *, threads: int = 1):
    """The runner for a module, a ``.pte``, an ``.onnx``, or a checkpoint (loaded eagerly)."""
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

    model = load_checkpoint(path)
    runner = EagerRunner(model, threads)
    if path.suffix == ".dsk":
        _apply_sparse_decisions(model, path)
        runner.runtime = "pytorch (.dsk)"
    return runner


def _apply_sparse_decisions(model: nn.Module, path: Path) -> None:
    """Run sparse the layers that export measured faster sparse (recorded in the sidecar)."""
    from deepshrink.formats.sparse_compute import CsrLinear
    from deepshrink.formats.sidecar import read_sidecar

    for decision in (read_sidecar(path) or {}).get("sparse_compute", []):
        if decision["runs_sparse"]:
            parent_name, _, child = decision["layer"].rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            dense = getattr(parent, child)
            setattr(parent, child, CsrLinear(dense.weight, dense.bias))
