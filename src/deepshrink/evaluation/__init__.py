"""Measure a model or an exported file in its own runtime: accuracy, size, sparsity, latency."""
from deepshrink.evaluation.metrics import Metrics, evaluate

__all__ = ["Metrics", "evaluate"]
