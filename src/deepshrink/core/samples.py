"""What a model is called with: one notion of *inputs* for every stage.

An input is a tensor, a tuple of tensors (positional arguments) or a dict of tensors (keyword
arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``), of any dtype. A *sample* is one
input without a batch dimension; a *batch* is the same structure with a leading batch dimension.
Calibration, training, evaluation, MAC counting, parity and export all call the model through
``call`` and never look inside an input otherwise — the model's calling convention stays here.

Shapes may vary between samples (token ids of different lengths, audio of any number of frames);
``stack`` batches only samples of equal shapes, and ``batches`` groups consecutive samples of one
shape, so nothing is padded or truncated silently.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from deepshrink.core.errors import DataError

Inputs = Union[torch.Tensor, tuple, dict]


def structure(inputs: Inputs) -> tuple:
    """A hashable description of ``inputs``: kind, keys, dtypes and ranks (not sizes)."""
    if isinstance(inputs, torch.Tensor):
        return ("tensor", str(inputs.dtype), inputs.ndim)
    if isinstance(inputs, (tuple, list)):
        return ("tuple",) + tuple(structure(t) for t in inputs)
    if isinstance(inputs, dict):
        return ("dict",) + tuple((str(k), structure(v)) for k, v in inputs.items())
    raise DataError(f"an input must be a tensor, a tuple of tensors or a dict of tensors, not {type(inputs).__name__}")


def describe(inputs_or_structure: Any) -> str:
    """``dict(input_ids: int64 rank 1, attention_mask: int64 rank 1)``."""
    s = inputs_or_structure if isinstance(inputs_or_structure, tuple) and inputs_or_structure and \
        inputs_or_structure[0] in ("tensor", "tuple", "dict") else structure(inputs_or_structure)
    if s[0] == "tensor":
        return f"{s[1].replace('torch.', '')} rank {s[2]}"
    if s[0] == "tuple":
        return "tuple(" + ", ".join(describe(t) for t in s[1:]) + ")"
    return "dict(" + ", ".join(f"{k}: {describe(v)}" for k, v in s[1:]) + ")"


def check_samples(samples: Sequence[Inputs], *, what: str) -> tuple:
    """The common structure of ``samples``; a ``DataError`` naming the first sample that differs."""
    if len(samples) == 0:
        raise DataError(f"{what}: no samples; give at least one")
    first = None
    for i, sample in enumerate(samples):
        try:
            s = structure(sample)
        except DataError as err:
            raise DataError(f"{what}[{i}]: {err}") from None
        _check_tensors(sample, f"{what}[{i}]")
        if first is None:
            first = s
        elif s != first:
            raise DataError(f"{what}[{i}] is {describe(s)} but {what}[0] is {describe(first)}; "
                            "every sample must have the same structure (keys, dtypes, ranks)")
    return first


def _check_tensors(inputs: Inputs, where: str) -> None:
    for t in flatten(inputs):
        if not isinstance(t, torch.Tensor):
            raise DataError(f"{where}: {type(t).__name__} is not a tensor")


def flatten(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs`` in call order (tuple order, dict order)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, (tuple, list)):
        return [t for part in inputs for t in flatten(part)]
    if isinstance(inputs, dict):
        return [t for v in inputs.values() for t in flatten(v)]
    return [inputs]


def names(inputs: Inputs, model: nn.Module | None = None) -> list[str]:
    """A name per flattened tensor: dict keys, else ``forward``'s parameter names, else ``input_i``."""
    if isinstance(inputs, dict):
        return [str(k) for k in inputs]
    n = len(flatten(inputs))
    params = forward_parameters(model) if model is not None else []
    if len(params) >= n:
        return params[:n]
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def forward_parameters(model: nn.Module | None) -> list[str]:
    """Names of ``model.forward``'s positional parameters (empty when they cannot be read); a
    wrapper that forwards its inputs (``wrapped_model``) answers for the model it wraps."""
    while getattr(model, "wrapped_model", None) is not None:
        model = model.wrapped_model
    return list(_signature_of(type(model))[0])


@functools.lru_cache(maxsize=256)
def _signature_of(cls: type) -> tuple[tuple[str, ...], bool]:
    """``(positional parameter names, takes *args)`` of ``cls.forward`` (``self`` left out)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError, AttributeError):
        return (), False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds), any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)


def as_call(inputs: Inputs, model: nn.Module | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``model`` with. A dict becomes positional arguments when its keys
    are, in order, the first parameters of ``forward`` (one order for every exporter), else kwargs."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    params = forward_parameters(model) if model is not None else []
    keys = list(inputs)
    renamed = bool(params) and not set(keys) & set(params) and len(params) == len(keys)
    if keys == params[:len(keys)] or renamed or (not params and _only_varargs(model)):
        # a captured graph takes its inputs positionally, in the order they were captured
        # (its placeholders may be renamed, e.g. args_0, args_1 for a forward(*args) wrapper)
        return tuple(inputs[k] for k in keys), {}
    return (), dict(inputs)


def takes_varargs(model) -> bool:
    """Whether ``model.forward`` itself takes ``*args`` (a wrapper that forwards its inputs)."""
    return _signature_of(type(model))[1]


def _only_varargs(model) -> bool:
    while getattr(model, "wrapped_model", None) is not None:
        model = model.wrapped_model
    return _signature_of(type(model))[1]


def call(model: Callable, inputs: Inputs):
    """``model(x)``, ``model(*x)`` or ``model(**x)`` — a dict positionally when ``forward`` takes its
    keys in that order (as ``as_call`` decides for capture, so a captured graph is called alike)."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    args, kwargs = as_call(inputs, model if isinstance(model, nn.Module) else None)
    return model(*args, **kwargs)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(map_tensors(fn, t) for t in inputs)
    return {k: map_tensors(fn, v) for k, v in inputs.items()}


def shapes(inputs: Inputs) -> tuple:
    return tuple(tuple(t.shape) for t in flatten(inputs))


def stack(samples: Sequence[Inputs]) -> Inputs:
    """One batch (new dimension 0) of samples of equal shapes."""
    first = samples[0]
    if any(shapes(s) != shapes(first) for s in samples[1:]):
        raise DataError("cannot stack samples of different shapes into one batch; batch them one shape at a time "
                        "(deepshrink.core.samples.batches) or pass a collate function that pads them")
    if isinstance(first, torch.Tensor):
        return torch.stack(list(samples))
    if isinstance(first, (tuple, list)):
        return tuple(stack([s[i] for s in samples]) for i in range(len(first)))
    return {k: stack([s[k] for s in samples]) for k in first}


def batch_size(batch: Inputs) -> int:
    return int(flatten(batch)[0].shape[0])


def take(batch: Inputs, start: int, stop: int) -> Inputs:
    """Rows ``start:stop`` of a batch."""
    return map_tensors(lambda t: t[start:stop], batch)


def unstack(batch: Inputs) -> list[Inputs]:
    """The samples of a batch."""
    return [map_tensors(lambda t, i=i: t[i], batch) for i in range(batch_size(batch))]


def batches(samples: Iterable[Inputs], batch_size_: int) -> Iterator[Inputs]:
    """Batches of up to ``batch_size_`` consecutive samples of one shape (a new batch when the shape changes)."""
    group: list[Inputs] = []
    for sample in samples:
        if group and (len(group) == batch_size_ or shapes(sample) != shapes(group[0])):
            yield stack(group)
            group = []
        group.append(sample)
    if group:
        yield stack(group)
