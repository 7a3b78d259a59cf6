"""Turn a model spec into a module, and a module into a checkpoint that can be loaded safely.

A spec is one of: a zoo name (``lenet-5``); ``path/to/file.py:ClassName`` (the user's own code,
imported from their file); a deepshrink checkpoint ``.safetensors`` (weights + how to rebuild the
skeleton); a compressed ``.dsk`` container (same, with sparse/codebook storage); or a ``.pt2`` ``torch.export`` program (runs without the original class definition —
how quantized and structurally shrunk models are saved).
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.core.errors import ArtifactError, ExportError, ModelLoadError
from deepshrink.core.io import atomic_path
from deepshrink.formats.checkpoint import read_checkpoint, write_checkpoint
from deepshrink.models.zoo import ZOO, create, get_arch, set_arch

# .dsk layouts written by higher layers (metadata "format" -> module with load_compressed), imported
# by name only when such a file is loaded, so this module depends on none of them
DSK_LAYOUTS = {"deepshrink.lowbit": "deepshrink.quantization.lowbit.storage"}

# operator namespaces a .pt2 program may call (torch.ops.<namespace>) -> the module whose import
# registers them: torch.export.load resolves every node's operator and fails on one not registered yet
OP_LIBRARIES = {"quantized_decomposed": "torchao.quantization.pt2e"}

# the files torch.export.save writes under an archive's root folder: programs, raw tensor payloads and
# their JSON configs, sample inputs. Anything else (compiled AOTInductor code, custom objects, legacy
# pickled weights) is refused rather than handed to a loader that would unpickle or run it.
_PROGRAM_FILES = re.compile(
    r"models/\w+\.json|data/weights/(weight_\d+|\w+_weights_config\.json)|data/constants/(tensor_\d+|\w+_constants_config\.json)"
    r"|data/sample_inputs/\w+\.pt|extra/[^/]+|archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id")
_OPERATOR = re.compile(r'"target":\s*"torch\.ops\.(\w+)\.(\w+)')


def load(spec: str | os.PathLike, *, code: str | None = None, **kwargs: Any) -> nn.Module:
    """A module from a spec. ``code``: ``path/to/file.py:NAME`` that rebuilds a checkpoint made from
    your own code — a checkpoint never names code that loading would run by itself."""
    text = str(spec)
    if text.endswith((".safetensors", ".pt2", ".dsk")) or (Path(text).suffix in PICKLE_SUFFIXES):
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
            from deepshrink.core.graph import capture

            # the batch stays free (and any dimension the model was quantized with varying): the
            # program loaded back runs every batch size the module did, not only the example's
            quant = getattr(model, "_deepshrink_quant", None) or {}
            training = model.training
            try:
                program = capture(model, example_input, dynamic=quant.get("dynamic"))
            except ExportError:   # a model whose batch cannot vary is saved at the example's shapes
                args, kwargs = S.as_call(example_input, model)
                program = torch.export.export(model, args, kwargs or None)
            finally:
                if model.training != training:   # capture traces in eval mode; the caller's module keeps its own
                    model.train(training)
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
        outputs = arch["outputs"]
        if not isinstance(outputs, list) or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in outputs):
            raise ModelLoadError(f"model: {where} records 'outputs' of the wrong type; it must be a list of names or positions")
        return select_outputs(build_from_arch(arch["inner"], where=where, code=code), outputs)
    if "zoo" in arch:
        if not isinstance(arch["zoo"], str):
            raise ModelLoadError(f"model: {where} records a zoo model name of the wrong type "
                                 f"({type(arch['zoo']).__name__}); choose one of {', '.join(ZOO)}")
        try:
            return create(arch["zoo"], **kwargs)
        except ModelLoadError as err:   # say which file recorded the name or arguments
            raise ModelLoadError(f"model: {where}: {str(err).removeprefix('model: ')}") from None
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


def check_fits_weights(arch: Any, tensors: dict, *, where: str) -> None:
    """``ModelLoadError`` unless the zoo model ``arch`` describes has exactly the file's tensor
    names and shapes — checked on the meta device (no memory), so a file whose metadata asks for
    a huge model is refused before anything is allocated. The user's own code is not run here."""
    if not _zoo_only(arch):
        return
    with torch.device("meta"):
        skeleton = build_from_arch(arch, where=where)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected == got:
        return
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ModelLoadError(f"model: weights in {where} do not fit {arch}: "
                             + (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}")
                             + f" ({len(missing)} missing, {len(extra)} unexpected)")
    name = next(k for k in expected if expected[k] != got[k])
    raise ModelLoadError(f"model: weights in {where} do not fit {arch}: {name!r} is {list(got[name])} in the file, "
                         f"the model has {list(expected[name])}")


def _zoo_only(arch: Any) -> bool:
    while isinstance(arch, dict) and "inner" in arch:
        arch = arch["inner"]
    return isinstance(arch, dict) and "zoo" in arch


def load_checkpoint(path: str | os.PathLike, *, code: str | None = None) -> nn.Module:
    """A module from a ``.safetensors`` / ``.dsk`` / ``.pt2`` file; ``code`` rebuilds one made from your own code."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model: checkpoint {path} does not exist")
    if path.suffix == ".pt2":
        module = load_program(path).module()
        # unlifting reads every stored tensor, also those the program never uses (the float originals
        # PT2E conversion leaves registered): without those reads the graph is the one that was saved
        for node in list(module.graph.nodes):
            if node.op == "get_attr" and not node.users:
                module.graph.erase_node(node)
        module.recompile()
        return module
    if path.suffix not in (".safetensors", ".dsk"):
        raise ModelLoadError(f"model: {path}: {unsupported_suffix(path.suffix)}; checkpoints load from .safetensors, .dsk or .pt2")
    try:
        if path.suffix == ".dsk":
            from deepshrink.formats.container import read_container

            tensors, meta = read_container(path)  # codebooks and sparse positions decode to dense tensors
            layout = meta.get("format")
            if layout is not None and not (isinstance(layout, str) and layout in DSK_LAYOUTS):
                raise ModelLoadError(f"model: {path}: metadata 'format' {json.dumps(layout)[:60]} is not a .dsk layout "
                                     f"this deepshrink reads (none, or {', '.join(DSK_LAYOUTS)}); upgrade deepshrink or "
                                     "save the model again")
            if layout is not None:
                return importlib.import_module(DSK_LAYOUTS[meta["format"]]).load_compressed(path, code=code)
        else:
            tensors, meta = read_checkpoint(path)
    except ArtifactError as err:
        raise ModelLoadError(f"model: {err}") from None
    arch = meta.get("arch") or {}
    check_fits_weights(arch, tensors, where=str(path))
    model = build_from_arch(arch, where=str(path), code=code)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"model: weights in {path} do not fit {arch}: {str(err).splitlines()[0]}") from None
    return model


# pickled PyTorch files: loading one runs whatever code its author put in it
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def unsupported_suffix(suffix: str) -> str:
    """Why a file of this suffix is not loaded, in words."""
    if suffix in PICKLE_SUFFIXES:
        return (f"{suffix} checkpoints are not loaded (pickle runs code): a {suffix} file is a pickle, and unpickling "
                "runs code from the file; save the weights with deepshrink.models.save_checkpoint (.safetensors)")
    return f"{suffix} files are not a format deepshrink reads" if suffix else "a file without a suffix is not a format deepshrink reads"


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """The ``torch.export`` program in a ``.pt2`` file, loaded without unpickling anything.

    ``torch.export.load`` unpickles with ``weights_only=False`` what it finds pickled — tensor-subclass
    weights, custom objects, the legacy layout, sample inputs the restricted unpickler refuses — so
    such an archive is refused before torch reads it, and its loader never reaches those paths. The
    bytes checked are the bytes loaded. The operators the program calls are registered first (a
    quantized program calls torchao's ``quantized_decomposed`` ops)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"model: cannot read {path}: {err.strerror or err}") from None
    files = _checked_program_files(data, path)
    _register_operators(files, path)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as err:  # torch raises many types for a bad archive
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(f"model: {path} is not a loadable torch.export program: {type(err).__name__}: {first}") from None


def _checked_program_files(data: bytes, path: Path) -> dict[str, bytes]:
    """The archive's programs, payload configs and sample inputs by name under its root folder; a
    ``ModelLoadError`` for an archive whose loading would unpickle or run code."""
    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(f"model: {path} is not a loadable torch.export program: {why}. Only plain programs (tensors, "
                              "no pickled objects) are loaded; save the model again with deepshrink.models.save_checkpoint")

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise refuse("it is not a .pt2 archive (not a zip file)") from None
    with archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        roots = {n.partition("/")[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise refuse("it is not laid out as torch.export.save writes (one root folder)")
        root = roots.pop()
        inner = {n[len(root) + 1:]: n for n in names}
        unknown = sorted(n for n in inner if not _PROGRAM_FILES.fullmatch(n))
        if unknown:
            raise refuse(f"it holds {unknown[0]}, which is not part of a plain torch.export program")
        files = {n: archive.read(full) for n, full in inner.items() if n.endswith((".json", ".pt"))}
    for name, blob in files.items():
        if not name.endswith("_config.json"):
            continue
        try:
            entries = json.loads(blob)["config"]
        except (ValueError, KeyError, TypeError):
            entries = None
        if not isinstance(entries, dict):
            raise refuse(f"{name} is not a payload config")
        prefix = "weight_" if "/weights/" in name else "tensor_"
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False or not str(meta.get("path_name")).startswith(prefix):
                raise refuse(f"{fqn!r} is stored pickled (a tensor subclass or custom object), not as raw tensor bytes")
    for name, blob in files.items():
        if name.endswith(".pt") and blob:
            try:  # torch tries this same restricted load first; only on its failure would it unpickle
                torch.load(io.BytesIO(blob), weights_only=True)
            except Exception as err:  # the restricted unpickler raises many types
                raise refuse(f"its sample inputs {name} hold objects beyond plain tensors ({type(err).__name__})") from None
    return files


def _register_operators(files: dict[str, bytes], path: Path) -> None:
    """Import the libraries that define the operators the archive's programs call; a
    ``ModelLoadError`` naming an operator nothing installed defines."""
    for name, blob in files.items():
        if not name.startswith("models/"):
            continue
        for namespace, op in sorted(set(_OPERATOR.findall(blob.decode("utf-8", "replace")))):
            if namespace in OP_LIBRARIES:
                try:
                    importlib.import_module(OP_LIBRARIES[namespace])
                except ImportError as err:
                    raise ModelLoadError(f"model: {path} calls torch.ops.{namespace}.{op}, defined by "
                                         f"{OP_LIBRARIES[namespace].split('.')[0]}, which does not import: {err}") from None
            if not hasattr(getattr(torch.ops, namespace), op):
                raise ModelLoadError(f"model: {path} calls torch.ops.{namespace}.{op}, which no loaded library defines; "
                                     "import the package that registers it before loading")
