"""PT2E observers: an activation observer that picks its range by a named method, and a weight
observer that keeps a grid the weight is already on.

``CalibrationObserver`` subclasses torchao's ``HistogramObserver`` for the histogram bookkeeping (merging batches
with different ranges); only ``calculate_qparams`` differs: the range comes from
``deepshrink.quantization.ranges``. It records what it saw and what it chose, for the
per-layer range report.

``GridPreservingWeightObserver`` is torchao's per-channel min/max weight observer, except for a
weight whose every row is already on a symmetric grid (``ops.grids``: weight QAT, weight-only
quantization) with codes within the spec's range: it returns that grid's scales, so the int8
codes are the grid's codes and the int8 file computes with exactly the trained weights (instead
of the weights rounded once more onto ``max|w| / qmax``). A 4-bit QAT weight thus keeps codes in
``[-7, 7]``, which the ``.onnx`` then stores at 4 bits (``deploy.onnx_storage``).
"""
from __future__ import annotations

import numpy as np
import torch
from torchao.quantization.pt2e import HistogramObserver
from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver

from deepshrink.core.errors import ConfigError
from deepshrink.ops.grids import row_grids
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


class GridPreservingWeightObserver(PerChannelMinMaxObserver):
    """Per-channel symmetric weight observer that returns the scales of the grid a weight is on (module doc)."""

    def forward(self, x_orig):
        self.observed = x_orig.detach()   # a weight: one constant tensor, seen whole
        return super().forward(x_orig)

    def calculate_qparams(self):
        grid = self.grid_scales()
        if grid is None:
            return super().calculate_qparams()
        return grid, torch.zeros(grid.numel(), dtype=torch.int64)

    def grid_scales(self) -> torch.Tensor | None:
        observed = getattr(self, "observed", None)
        if observed is None or self.qscheme != torch.per_channel_symmetric or observed.dtype != torch.float32:
            return None
        rows = np.moveaxis(observed.numpy(), self.ch_axis, 0).reshape(observed.shape[self.ch_axis], -1)
        found = row_grids(rows)
        if found is None:
            return None
        codes, scales = found
        if np.abs(codes).max(initial=0) > min(-self.quant_min, self.quant_max):
            return None   # the grid is finer than the spec's range: the usual scales
        return torch.from_numpy(scales)
