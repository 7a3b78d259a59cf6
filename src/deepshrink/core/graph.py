"""Capturing a model as a ``torch.export`` graph: the batch dimension free, and any other
dimension the user names.

Quantization (PT2E) and every exporter start from this graph, so they all agree on it. The
inputs are any ``core.samples`` batch (a tensor, a tuple or a dict of tensors, any dtype).

``dynamic`` names the dimensions that vary, per input (by ``forward`` argument name or
position) — ``{"input_ids": {1: (2, 128)}, "attention_mask": {1: (2, 128)}}``. Dimensions given the
same range share one ``torch.export.Dim`` (token ids and their mask have one length), so the
``.pte`` and the ``.onnx`` agree on what may vary.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import ExportError

DynamicSpec = Mapping[str | int, Mapping[int, tuple[int, int]]]


def check_dynamic(dynamic: DynamicSpec | None, names: list[str], ranks: list[int]) -> dict[int, dict[int, tuple[int, int]]]:
    """``{flat input index: {dim: (min, max)}}``; a ``ExportError`` naming an unknown input, a bad dim or range."""
    resolved: dict[int, dict[int, tuple[int, int]]] = {}
    for key, dims in (dynamic or {}).items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            index = int(key)
            if index >= len(names):
                raise ExportError(f"export.dynamic: input position {index} is out of range; the model takes {len(names)} inputs ({', '.join(names)})")
        elif key in names:
            index = names.index(key)
        else:
            raise ExportError(f"export.dynamic: no input named {key!r}; the model's inputs are {', '.join(names)}")
        for dim, bounds in dims.items():
            dim = int(dim)
            if not 1 <= dim < ranks[index]:
                raise ExportError(f"export.dynamic.{names[index]}: dimension {dim} is not one of 1..{ranks[index] - 1} "
                                  "(0 is the batch, always dynamic)")
            lo, hi = (int(b) for b in bounds)
            if not 2 <= lo <= hi:
                raise ExportError(f"export.dynamic.{names[index]}.{dim}: range [{lo}, {hi}] must satisfy 2 <= min <= max "
                                  "(torch.export specialises sizes 0 and 1)")
            resolved.setdefault(index, {})[dim] = (lo, hi)
    return resolved


def capture(model: nn.Module, example_input: Any, *, max_batch: int = 1024, dynamic: DynamicSpec | None = None,
            static_batch: bool = False, training: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with the batch dimension free in ``[1, max_batch]`` (or fixed
    to 1 with ``static_batch``) and the ``dynamic`` dimensions free in their ranges; in training
    mode with ``training`` (QAT keeps batch norm live)."""
    first = S.take(example_input, 0, 1)
    names = S.names(first, model)
    tensors = S.flatten(first)
    resolved = check_dynamic(dynamic, names, [t.ndim for t in tensors])
    # an example batch of 2, and each dynamic dimension at a size inside its range that is not 1:
    # torch.export specialises dimensions of size 1
    batch = 1 if static_batch else 2

    def sized(index: int, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(batch, *t.shape[1:]).contiguous()
        for dim, (lo, hi) in resolved.get(index, {}).items():
            if not lo <= t.shape[dim] <= hi:
                raise ExportError(f"export.dynamic.{names[index]}.{dim}: the example's size {t.shape[dim]} is outside "
                                  f"[{lo}, {hi}]; widen the range or give an example inside it")
        return t

    flat = [sized(i, t) for i, t in enumerate(tensors)]
    dims: dict[tuple, torch.export.Dim] = {}
    batch_dim = None if static_batch else torch.export.Dim("batch", min=1, max=max_batch)

    def shape_spec(index: int) -> dict:
        spec = {} if batch_dim is None else {0: batch_dim}
        for dim, (lo, hi) in resolved.get(index, {}).items():
            key = (lo, hi)
            if key not in dims:
                dims[key] = torch.export.Dim(f"d{len(dims)}_{lo}_{hi}", min=lo, max=hi)
            spec[dim] = dims[key]
        return spec or None

    rebuilt = _rebuild(first, flat)
    args, kwargs = S.as_call(rebuilt, model)
    flat_specs = [shape_spec(i) for i in range(len(flat))]
    if kwargs:
        dynamic_shapes: Any = {k: spec for k, spec in zip(kwargs, flat_specs)}
    elif S.takes_varargs(model):
        dynamic_shapes = (tuple(flat_specs),)   # forward(*args): the specs of the packed arguments, as one entry
    else:
        dynamic_shapes = tuple(flat_specs)
    try:
        if hasattr(model, "train"):
            try:
                model.train(training)
            except NotImplementedError:  # exported graph modules cannot switch modes
                pass
        return torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # torch.export raises many types; name the cause in one line
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if resolved and ("Constraints violated" in str(err) or "specializ" in str(err).lower() or "guard" in str(err).lower()):
            hint = " (a dynamic range the model cannot take: narrow it, or fix the size the model requires)"
        purpose = " for QAT" if training else ""
        raise ExportError(f"torch.export could not capture {type(model).__name__}{purpose}{hint}: {first_line}") from err


def varying_dims(samples: list) -> dict[int, dict[int, tuple[int, int]]]:
    """The dimensions that vary between ``samples`` (unbatched), as a ``dynamic`` spec in batch
    coordinates keyed by flat input position: ``{0: {1: (min, max)}}``; sizes below 2 round up to 2."""
    if not samples:
        return {}
    shapes = [S.shapes(s) for s in samples]
    spec: dict[int, dict[int, tuple[int, int]]] = {}
    for index, first in enumerate(shapes[0]):
        for dim in range(len(first)):
            sizes = [shape[index][dim] for shape in shapes]
            if min(sizes) != max(sizes):
                spec.setdefault(index, {})[dim + 1] = (max(2, min(sizes)), max(2, max(sizes)))
    return spec


def _rebuild(template: Any, flat: list[torch.Tensor]) -> Any:
    """``template``'s structure with its tensors replaced, in order, by ``flat``."""
    it = iter(flat)
    return S.map_tensors(lambda _: next(it), template)


def drop_unused_weights(gm: torch.fx.GraphModule) -> int:
    """Remove, in place, the tensors a graph module holds but its graph never reads — the float
    originals PT2E conversion leaves registered beside the int8 weights it folded. A capture of the
    module lifts every registered tensor, so without this every exported file carries them too.
    Returns the number of bytes removed."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    removed = 0
    for name, tensor in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if any(name == t or t.startswith(name + ".") or name.startswith(t + ".") for t in read):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        removed += tensor.numel() * tensor.element_size()
        delattr(owner, attr)
    gm.recompile()
    return removed
