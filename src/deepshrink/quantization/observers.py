"""A PT2E activation observer that collects a histogram and picks the range by a named method.

It subclasses torchao's ``HistogramObserver`` for the histogram bookkeeping (merging batches
with different ranges); only ``calculate_qparams`` differs: the range comes from
``deepshrink.quantization.ranges``. It records what it saw and what it chose, for the
per-layer range report.
"""
from __future__ import annotations

import torch
from torchao.quantization.pt2e import HistogramObserver

from deepshrink.core.errors import ConfigError
from deepshrink.quantization import ranges

METHODS = ("minmax", "histogram", "percentile", "mse", "entropy")


class CalibrationObserver(HistogramObserver):
    """``method``: one of ``METHODS``; ``percentile`` is used by ``percentile`` only."""

    def __init__(self, method: str = "histogram", percentile: float = 99.99, bins: int = 2048, **kwargs) -> None:
        if method not in METHODS:
            raise ConfigError(f"calibration: {method!r} is not allowed; choose one of {', '.join(map(repr, METHODS))}")
        super().__init__(bins=bins, **kwargs)
        self.method = method
        self.percentile = percentile

    def observed_range(self) -> tuple[float, float] | None:
        if self.min_val.numel() == 0 or torch.isinf(self.min_val).item():
            return None
        return float(self.min_val), float(self.max_val)

    def chosen_range(self) -> tuple[float, float] | None:
        """The clipping range the method picks (before it is stretched to include 0)."""
        seen = self.observed_range()
        if seen is None:
            return None
        lo, hi = seen
        if self.method == "minmax" or lo == hi:
            return lo, hi
        if self.method == "histogram":
            new_min, new_max = self._non_linear_param_search()
            return float(new_min), float(new_max)
        counts = self.histogram.detach().double().numpy()
        levels = self.quant_max - self.quant_min + 1
        if self.method == "percentile":
            return ranges.percentile_range(counts, lo, hi, self.percentile)
        if self.method == "mse":
            return ranges.mse_range(counts, lo, hi, levels=levels)
        return ranges.entropy_range(counts, lo, hi, levels=levels)

    def calculate_qparams(self):
        chosen = self.chosen_range()
        if chosen is None:  # never observed: the base class warns and returns its default
            return super().calculate_qparams()
        lo, hi = chosen
        return self._calculate_qparams(torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"method={self.method}, percentile={self.percentile}, " + super().extra_repr()
