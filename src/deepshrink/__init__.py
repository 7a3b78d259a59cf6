"""deepshrink: prune and quantize PyTorch models for phones and edge CPUs, and prove it in the runtime.

``import deepshrink`` is cheap: submodules (and the runtimes behind them) load on first use.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

try:
    __version__ = importlib.metadata.version("deepshrink")   # one source of truth: pyproject.toml
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

_LAZY = {
    # the two verbs (deepshrink's own training loop supplied) and what they did
    "prune": ("deepshrink.api", "prune"),
    "quantize": ("deepshrink.api", "quantize"),
    "prune_report": ("deepshrink.pruning", "prune_report"),
    "quantize_report": ("deepshrink.quantization", "quantize_report"),
    "finalize": ("deepshrink.pruning", "finalize"),
    # pruning configs: criteria, structured, scheduled, and the schedules
    "PruningConfig": ("deepshrink.pruning", "PruningConfig"),
    "MagnitudePruning": ("deepshrink.pruning", "MagnitudePruning"),
    "GradientPruning": ("deepshrink.pruning", "GradientPruning"),
    "TaylorPruning": ("deepshrink.pruning", "TaylorPruning"),
    "RandomPruning": ("deepshrink.pruning", "RandomPruning"),
    "VariationalDropout": ("deepshrink.pruning", "VariationalDropout"),
    "ChannelPruning": ("deepshrink.pruning.structured", "ChannelPruning"),
    "TransformerPruning": ("deepshrink.pruning.structured", "TransformerPruning"),
    "ScheduledPruning": ("deepshrink.pruning", "ScheduledPruning"),
    "OneShot": ("deepshrink.pruning", "OneShot"),
    "Iterative": ("deepshrink.pruning", "Iterative"),
    "Gradual": ("deepshrink.pruning", "Gradual"),
    "register_criterion": ("deepshrink.pruning", "register_criterion"),
    # quantization configs
    "Int8Static": ("deepshrink.quantization", "Int8Static"),
    "MixedPrecision": ("deepshrink.quantization", "MixedPrecision"),
    "Int8Dynamic": ("deepshrink.quantization", "Int8Dynamic"),
    "Int8QAT": ("deepshrink.quantization", "Int8QAT"),
    "Int8WithinBudget": ("deepshrink.quantization", "Int8WithinBudget"),
    "WeightOnly": ("deepshrink.quantization.lowbit", "WeightOnly"),
    "Int8DynamicLowBit": ("deepshrink.quantization.lowbit", "Int8DynamicLowBit"),
    "WeightQAT": ("deepshrink.quantization.lowbit", "WeightQAT"),
    "Codebook": ("deepshrink.quantization.lowbit", "Codebook"),
    "activation_ranges": ("deepshrink.quantization", "activation_ranges"),
    "layer_sqnr_report": ("deepshrink.quantization", "layer_sqnr_report"),
    # training: the default loop, and how the configs that train say how
    "fit": ("deepshrink.training", "fit"),
    "TrainConfig": ("deepshrink.core.loops", "TrainConfig"),
    "Distillation": ("deepshrink.core.loops", "Distillation"),
    "export": ("deepshrink.deploy", "export"),
    "evaluate": ("deepshrink.evaluation", "evaluate"),
    "run_recipe": ("deepshrink.pipeline", "run_recipe"),
    "load_recipe": ("deepshrink.pipeline", "load_recipe"),
    # deprecated for one release: the verbs that ScheduledPruning, ChannelPruning and Int8WithinBudget replace
    "prune_with_schedule": ("deepshrink.api", "prune_with_schedule"),
    "prune_channels": ("deepshrink.api", "prune_channels"),
    "quantize_within_budget": ("deepshrink.api", "quantize_within_budget"),
}
_SUBMODULES = {"data", "models", "core", "ops", "formats", "pruning", "quantization", "training", "evaluation", "deploy", "pipeline", "report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"deepshrink.{name}")
    raise AttributeError(f"module 'deepshrink' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_LAZY, *_SUBMODULES, "__version__"])
