"""The two verbs as ``import deepshrink as ds`` offers them: ``ds.prune`` and ``ds.quantize``.

They are ``deepshrink.pruning.prune`` and ``deepshrink.quantization.quantize`` with deepshrink's
own loop supplied: ``train_fn`` defaults to ``deepshrink.training.fit`` and ``accuracy_fn`` to
``deepshrink.training.accuracy`` (the transforms themselves never import the training package;
``core.loops`` says what a loop is). Pass your own ``train_fn(model, data, config, ...)`` to train
with your loop instead.

One return convention for both: the verb returns the model to use from then on — ``prune``
the same module, pruned in place; ``quantize`` a new graph (int8 schemes) or the same module
(weight-only schemes). What was done is read back with ``prune_report(model)`` /
``quantize_report(model)``.

The separate verbs of earlier releases stay one release as deprecated aliases.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn


def _fit(progress: bool | None):
    from deepshrink.training import fit

    return functools.partial(fit, progress=progress)


def _accuracy():
    from deepshrink.training import accuracy

    return accuracy


def prune(model: nn.Module, config: Any, *, data=None, example_input=None, target: str = "xnnpack",
          train_fn=None, teacher: nn.Module | None = None, progress: bool | None = False) -> nn.Module:
    """Prune ``model`` in place as ``config`` says and return it; ``prune_report(model)`` says what was done.

    ``config``: a criterion (``MagnitudePruning(sparsity=0.9)``, ``TaylorPruning``, ``VariationalDropout``...),
    ``ChannelPruning`` (whole channels go; give ``example_input`` or ``data``) or ``ScheduledPruning``
    (a criterion reached along ``OneShot`` / ``Iterative`` / ``Gradual`` with training between prunes).
    ``train_fn``: the loop for the configs that train (default ``deepshrink.training.fit``, with
    ``progress``); ``teacher``: distilled from when the config's ``train.distill`` is set. The masks
    live in the module, so your own loop (or a Hugging Face ``Trainer``) keeps pruned weights at 0;
    ``deepshrink.finalize(model)`` makes them permanent. See ``deepshrink.pruning.prune``.
    """
    from deepshrink.pruning import prune as prune_

    return prune_(model, config, data=data, example_input=example_input, target=target,
                  train_fn=train_fn or _fit(progress), teacher=teacher)


def quantize(model: nn.Module, config: Any, *, data, target="xnnpack", dynamic: dict | None = None,
             train_fn=None, accuracy_fn=None, progress: bool | None = False) -> nn.Module:
    """``model`` quantized as ``config`` says; keep the returned model (``quantize_report`` says what was done).

    ``config``: ``Int8Static``, ``Int8Dynamic``, ``Int8QAT``, ``Int8WithinBudget``, ``WeightOnly``,
    ``WeightQAT`` or ``Codebook``. The int8 schemes return a new graph and leave ``model`` as it was;
    the weight-only ones change ``model`` in place and return it. ``train_fn`` / ``accuracy_fn``:
    default ``deepshrink.training.fit`` (with ``progress``) / ``accuracy``. See
    ``deepshrink.quantization.quantize``.
    """
    from deepshrink.quantization import quantize as quantize_

    return quantize_(model, config, data=data, target=target, dynamic=dynamic,
                     train_fn=train_fn or _fit(progress), accuracy_fn=accuracy_fn or _accuracy())


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"deepshrink.{old} is deprecated and will be removed in the next release: use {new}",
                  DeprecationWarning, stacklevel=3)


def prune_with_schedule(model: nn.Module, config, schedule, *, data, train_config, teacher=None,
                        progress: bool | None = False, train_fn=None):
    """Deprecated: ``prune(model, ScheduledPruning(config, schedule, train=train_config), data=data)``,
    then ``prune_report(model).steps`` (what this returns)."""
    from deepshrink.pruning.configs import ScheduledPruning
    from deepshrink.pruning.iterative import run_schedule

    _deprecated("prune_with_schedule", "deepshrink.prune(model, ScheduledPruning(config, schedule, train=...), data=data)")
    return run_schedule(model, ScheduledPruning(config, schedule, train_config), data=data,
                        train_fn=train_fn or _fit(progress), teacher=teacher, train_key="train_config").steps


def prune_channels(model: nn.Module, config, *, example_input, data=None, target: str = "xnnpack", train_config=None,
                   teacher=None, progress: bool | None = False, train_fn=None):
    """Deprecated: ``prune(model, ChannelPruning(..., train=train_config), example_input=...)``,
    then ``prune_report(model)`` (what this returns)."""
    from deepshrink.pruning.structured.api import prune_channels as prune_channels_

    _deprecated("prune_channels", "deepshrink.prune(model, ChannelPruning(...), example_input=...)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return prune_channels_(model, config, example_input=example_input, data=data, target=target,
                               train_config=train_config, teacher=teacher, train_fn=train_fn or _fit(progress))


def quantize_within_budget(model: nn.Module, data, *, max_drop_pt: float, train_fn=None, accuracy_fn=None, **options):
    """Deprecated: ``quantize(model, Int8WithinBudget(max_drop_pt=..., ptq=..., qat=...), data=data)``,
    then ``quantize_report(q)["budget"]``; returns ``(model, BudgetReport)`` as before."""
    from deepshrink.quantization.budget import search_within_budget

    _deprecated("quantize_within_budget", "deepshrink.quantize(model, Int8WithinBudget(...), data=data)")
    return search_within_budget(model, data, max_drop_pt=max_drop_pt, train_fn=train_fn or _fit(False),
                                accuracy_fn=accuracy_fn or _accuracy(), **options)


__all__ = ["prune", "quantize", "prune_with_schedule", "prune_channels", "quantize_within_budget"]
