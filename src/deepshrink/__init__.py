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
    "prune": ("deepshrink.pruning", "prune"),
    "finalize": ("deepshrink.pruning", "finalize"),
    "MagnitudePruning": ("deepshrink.pruning", "MagnitudePruning"),
    "GradientPruning": ("deepshrink.pruning", "GradientPruning"),
    "TaylorPruning": ("deepshrink.pruning", "TaylorPruning"),
    "RandomPruning": ("deepshrink.pruning", "RandomPruning"),
    "prune_with_schedule": ("deepshrink.pruning", "prune_with_schedule"),
    "prune_channels": ("deepshrink.pruning.structured", "prune_channels"),
    "ChannelPruning": ("deepshrink.pruning.structured", "ChannelPruning"),
    "quantize": ("deepshrink.quantization", "quantize"),
    "Int8Static": ("deepshrink.quantization", "Int8Static"),
    "Int8Dynamic": ("deepshrink.quantization", "Int8Dynamic"),
    "Int8QAT": ("deepshrink.quantization", "Int8QAT"),
    "activation_ranges": ("deepshrink.quantization", "activation_ranges"),
    "layer_sqnr_report": ("deepshrink.quantization", "layer_sqnr_report"),
    "quantize_within_budget": ("deepshrink.quantization", "quantize_within_budget"),
    "WeightOnly": ("deepshrink.quantization.lowbit", "WeightOnly"),
    "WeightQAT": ("deepshrink.quantization.lowbit", "WeightQAT"),
    "Codebook": ("deepshrink.quantization.lowbit", "Codebook"),
    "fit": ("deepshrink.training", "fit"),
    "TrainConfig": ("deepshrink.training", "TrainConfig"),
    "Distillation": ("deepshrink.training", "Distillation"),
    "export": ("deepshrink.deploy", "export"),
    "evaluate": ("deepshrink.evaluation", "evaluate"),
    "run_recipe": ("deepshrink.pipeline", "run_recipe"),
    "load_recipe": ("deepshrink.pipeline", "load_recipe"),
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
