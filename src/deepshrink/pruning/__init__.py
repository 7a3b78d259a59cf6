"""Pruning: score weights, pick a mask, apply it; finalize makes the result really smaller."""
from deepshrink.pruning.api import PruneReport, finalize, prune
from deepshrink.pruning.configs import MagnitudePruning, PruningConfig

__all__ = ["prune", "finalize", "PruneReport", "PruningConfig", "MagnitudePruning"]
