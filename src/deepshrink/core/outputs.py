"""What a model returns, as tensors: one output adapter for fit, evaluate, parity and export.

A model may return a tensor, a tuple or list, a dict, or a dataclass such as a transformers
``ModelOutput``. ``output_tensors`` flattens any of these into a tuple of tensors (fields in
their declared order, ``None`` fields skipped); ``primary`` is the first of them — the logits of a
classifier, ``last_hidden_state`` of a Hugging Face encoder. ``SelectOutputs`` wraps a model so
that it returns exactly the tensors a user names (``["pooler_output"]``, ``[0, 2]``) or what a
user function returns; because it is a module, torch.export captures it and every exported file
returns the same tensors the fine-tuning and the evaluation saw.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deepshrink.core.errors import ConfigError


def output_tensors(output: Any) -> tuple[torch.Tensor, ...]:
    """Every tensor in ``output``, in order."""
    if isinstance(output, torch.Tensor):
        return (output,)
    if output is None:
        return ()
    if isinstance(output, dict):          # includes transformers' ModelOutput (an OrderedDict)
        return tuple(t for v in output.values() for t in output_tensors(v))
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return tuple(t for f in dataclasses.fields(output) for t in output_tensors(getattr(output, f.name)))
    if isinstance(output, (tuple, list)):
        return tuple(t for v in output for t in output_tensors(v))
    raise ConfigError(f"model output: {type(output).__name__} holds no tensors; return tensors, or wrap the model "
                      "with deepshrink.core.outputs.SelectOutputs(model, fn) to pick them")


def output_kind(first_output: torch.Tensor) -> str:
    """``classification`` (2-D rows of scores), ``embedding`` (2-D rows of unit norm) or ``tensor``
    (anything else): what a fidelity figure compares (``evaluation.fidelity``)."""
    t = first_output.detach().float()
    if t.ndim == 2 and t.shape[-1] >= 2:
        norms = t.norm(dim=-1)
        return "embedding" if bool(((norms - 1).abs() < 1e-2).all()) else "classification"
    return "tensor"


def primary(output: Any) -> torch.Tensor:
    """The first tensor of ``output``."""
    tensors = output_tensors(output)
    if not tensors:
        raise ConfigError("model output: the model returned no tensor")
    return tensors[0]


def _pick(output: Any, key: str | int) -> torch.Tensor:
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        tensors = output_tensors(output)
        index = int(key)
        if index >= len(tensors):
            raise ConfigError(f"outputs: index {index} is out of range; the model returns {len(tensors)} tensors")
        return tensors[index]
    if isinstance(output, dict) and key in output:
        return output[key]
    if hasattr(output, key) and isinstance(getattr(output, key), torch.Tensor):
        return getattr(output, key)
    available = list(output.keys()) if isinstance(output, dict) else [
        f.name for f in dataclasses.fields(output)] if dataclasses.is_dataclass(output) else []
    raise ConfigError(f"outputs: the model's output has no tensor {key!r}; it has {', '.join(map(str, available)) or 'no named fields'}")


class SelectOutputs(nn.Module):
    """``model`` returning only the named outputs (or ``fn(output)``): a tensor for one, a tuple for several."""

    def __init__(self, model: nn.Module, select: Sequence[str | int] | Callable[[Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.select = select
        self.training = model.training   # the wrapped model's mode, not nn.Module's default (train)

    @property
    def wrapped_model(self) -> nn.Module:
        return self.model

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        if callable(self.select):
            picked = output_tensors(self.select(output))
        else:
            picked = tuple(_pick(output, key) for key in self.select)
        return picked[0] if len(picked) == 1 else picked
