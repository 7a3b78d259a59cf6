"""Turn a model spec into a module, and a module into a checkpoint that can be loaded safely.

A spec is one of: a zoo name (``lenet-5``); ``path/to/file.py:ClassName`` (the user's own code,
imported from their file); a deepshrink checkpoint ``.safetensors`` (weights + how to rebuild the
skeleton); a compressed ``.dsk`` container (same, with sparse/codebook storage); or a ``.pt2`` ``torch.export`` program (runs without the original class definition —
how quantized and structurally shrunk models are saved).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.core.errors import ArtifactError, ModelLoadError
from deepshrink.core.io import atomic_path
from deepshrink.formats.checkpoint import read_checkpoint, write_checkpoint
from deepshrink.models.zoo import ZOO, create, get_arch, set_arch

# .dsk layouts written by higher layers (metadata "format" -> module with load_compressed), imported
# by name only when such a file is loaded, so this module depends on none of them
DSK_LAYOUTS = {"deepshrink.lowbit": "deepshrink.quantization.lowbit.storage"}


def load(spec: str | os.PathLike, *, code: str | None = None, **kwargs: Any) -> nn.Module:
    """A module from a spec. ``code``: ``path/to/file.py:NAME`` that rebuilds a checkpoint made from
    your own code — a checkpoint never names code that loading would run by itself."""
    text = str(spec)
    if text.endswith((".safetensors", ".pt2", ".dsk")) or (Path(text).suffix in {".pt", ".pth", ".ckpt"}):
        return load_checkpoint(text, code=code)
    if ":" in text and text.split(":", 1)[0].endswith(".py"):
        return load_user_class(text, **kwargs)
    if text in ZOO:
        return create(text, **kwargs)
    raise ModelLoadError(
        f"model: {text!r} is not a zoo model ({', '.join(ZOO)}), a path/to/file.py:ClassName, or a .safetensors/.pt2 checkpoint"
    )


def load_user_class(spec: str, **kwargs: Any) -> nn.Module:
    """``path/to/file.py:NAME``: an ``nn.Module`` class, or a callable returning a module (a loader
    that reads the user's pretrained weights), called with ``kwargs``. Runs that file's code."""
    from deepshrink.core.userfile import load_object

    file_part, _, class_name = spec.rpartition(":")
    path = Path(file_part)
    factory = load_object(spec, what="model", error=ModelLoadError)
    if not callable(factory):
        raise ModelLoadError(f"model: {class_name!r} in {path} is a {type(factory).__name__}, not an nn.Module class "
                             "or a function returning one")
    try:
        model = factory(**kwargs)
    except BaseException as err:  # the user's code may raise anything, even SystemExit
        if isinstance(err, KeyboardInterrupt):
            raise
        raise ModelLoadError(f"model: {class_name}(**{kwargs}) failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model: {class_name}(**{kwargs}) in {path} returned a {type(model).__name__}, not an nn.Module")
    set_arch(model, {"file": str(path.resolve()), "class": class_name, "kwargs": dict(kwargs)})
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, example_input: torch.Tensor | None = None) -> Path:
    """Save weights + architecture (``.safetensors``, or ``.dsk`` stored sparse), or a program (``.pt2``)."""
    path = Path(path)
    if path.suffix == ".pt2":
        if example_input is None:
            raise ModelLoadError(f"{path}: saving a .pt2 program needs an example input")
        if isinstance(model, torch.export.ExportedProgram):
            program = model
        else:
            from deepshrink.core import samples as S

            args, kwargs = S.as_call(example_input, model)
            program = torch.export.export(model, args, kwargs or None)
        with atomic_path(path) as tmp:
            torch.export.save(program, str(tmp))
        return path
    arch = get_arch(model)
    if arch is None:
        raise ModelLoadError(
            f"{path}: this module has no recorded architecture (a graph module, or a model built outside deepshrink); "
            "say how to rebuild it with deepshrink.models.record_loader(model, 'path/to/file.py:NAME', **kwargs), "
            "or save it as .pt2"
        )
    if path.suffix == ".dsk":
        from deepshrink.formats.container import record_for, write_container

        # each tensor stored the cheapest way its values allow: dense, or sparse positions + values
        records = [record_for(name, tensor) for name, tensor in model.state_dict().items()]
        return write_container(path, records, {"arch": arch})
    return write_checkpoint(path, model.state_dict(), {"arch": arch})


def record_loader(model: nn.Module, spec: str, **kwargs: Any) -> nn.Module:
    """Record that ``path/to/file.py:NAME(**kwargs)`` rebuilds ``model`` (a class or a loader
    function), so its checkpoints and ``.dsk`` files store that — never a pickle. Loading them
    later needs the same spec named again (``code=``); nothing is imported here."""
    from deepshrink.core.userfile import is_spec

    if not is_spec(spec):
        raise ModelLoadError(f"record_loader: {spec!r} is not path/to/file.py:NAME")
    file_part, _, name = spec.rpartition(":")
    if not Path(file_part).is_file():
        raise ModelLoadError(f"record_loader: file {file_part} does not exist")
    set_arch(model, {"file": str(Path(file_part).resolve()), "class": name, "kwargs": dict(kwargs)})
    return model


def select_outputs(model: nn.Module, keys: list) -> nn.Module:
    """``model`` returning only the outputs named by ``keys`` (names or positions), rebuildable from its arch."""
    from deepshrink.core.outputs import SelectOutputs

    wrapped = SelectOutputs(model, list(keys))
    inner = get_arch(model)
    if inner is not None:
        set_arch(wrapped, {"outputs": list(keys), "inner": inner})
    return wrapped


def build_from_arch(arch: dict, *, where: str, code: str | None = None) -> nn.Module:
    """A fresh module from a recorded architecture (``{"zoo": ..}`` or ``{"file": .., "class": ..}``).

    A module built by the user's code is rebuilt only from ``code`` — the ``path/to/file.py:NAME``
    the person loading names — never from the path recorded in the file: a checkpoint is data, and
    importing a file it names would run code nobody chose to run."""
    if not isinstance(arch, dict):
        raise ModelLoadError(f"model: {where} records its architecture as a {type(arch).__name__}, not an object")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ModelLoadError(f"model: {where} records arguments of the wrong type ({type(kwargs).__name__})")
    if "outputs" in arch and "inner" in arch:   # a model wrapped to return the named outputs
        return select_outputs(build_from_arch(arch["inner"], where=where, code=code), arch["outputs"])
    if "zoo" in arch:
        return create(arch["zoo"], **kwargs)
    if "file" in arch and "class" in arch:
        name, file_name = str(arch["class"]), Path(str(arch["file"])).name
        if code is None:
            raise ModelLoadError(
                f"model: {where} was built by your code {name!r} from {file_name}; rebuilding it runs that code, so "
                f"name the file yourself: code='path/to/{file_name}:{name}' (CLI: --model-code path/to/{file_name}:{name})")
        if code.rpartition(":")[2] != name:
            raise ModelLoadError(f"model: {where} was built by {name!r} from {file_name}, but the code named is {code!r}")
        return load_user_class(code, **kwargs)
    raise ModelLoadError(f"model: {where} does not say how to rebuild its architecture")


def load_checkpoint(path: str | os.PathLike, *, code: str | None = None) -> nn.Module:
    """A module from a ``.safetensors`` / ``.dsk`` / ``.pt2`` file; ``code`` rebuilds one made from your own code."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model: checkpoint {path} does not exist")
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module()
        except Exception as err:  # torch raises many types for a bad archive
            raise ModelLoadError(f"model: {path} is not a loadable torch.export program: {type(err).__name__}: {err}") from None
    if path.suffix not in (".safetensors", ".dsk"):
        raise ModelLoadError(f"model: {path.suffix} checkpoints are not loaded (pickle runs code); use .safetensors, .dsk or .pt2")
    try:
        if path.suffix == ".dsk":
            from deepshrink.formats.container import read_container

            tensors, meta = read_container(path)  # codebooks and sparse positions decode to dense tensors
            if meta.get("format") in DSK_LAYOUTS:
                return importlib.import_module(DSK_LAYOUTS[meta["format"]]).load_compressed(path, code=code)
        else:
            tensors, meta = read_checkpoint(path)
    except ArtifactError as err:
        raise ModelLoadError(f"model: {err}") from None
    arch = meta.get("arch") or {}
    model = build_from_arch(arch, where=str(path), code=code)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"model: weights in {path} do not fit {arch}: {str(err).splitlines()[0]}") from None
    return model
