"""Choosing an activation's quantization range from a histogram of calibration values.

Pure functions of ``(counts, lo, hi)``: ``counts[i]`` values fell in
``[lo + i * w, lo + (i + 1) * w)`` with ``w = (hi - lo) / len(counts)``. Each returns the
clipping range ``(min, max)``; the caller turns it into a scale and zero point (which
always stretch the range to include 0). ``levels`` is the number of integer codes (256
for int8).
"""
from __future__ import annotations

import numpy as np

from deepshrink.core.errors import ConfigError


def percentile_range(counts: np.ndarray, lo: float, hi: float, percentile: float) -> tuple[float, float]:
    """Clip ``(100 - percentile) %`` of the values off each tail (linear inside a bin)."""
    if not 50.0 < percentile <= 100.0:
        raise ConfigError(f"percentile: {percentile} is outside (50, 100]")
    counts = _check(counts, lo, hi)
    tail = (100.0 - percentile) / 100.0
    return _quantile(counts, lo, hi, tail), _quantile(counts, lo, hi, 1.0 - tail)


def mse_range(counts: np.ndarray, lo: float, hi: float, *, levels: int = 256, grid: int = 100) -> tuple[float, float]:
    """Range ``[a, b]`` of least expected squared error over the histogram.

    Values inside contribute the rounding noise ``step^2 / 12`` with ``step = (b - a) / (levels - 1)``;
    values outside contribute their squared distance to the clipped end (at bin centres).
    ``a`` and ``b`` are searched on ``grid`` points each between 0 and the observed ends.
    """
    counts = _check(counts, lo, hi)
    centers = lo + (np.arange(len(counts)) + 0.5) * (hi - lo) / len(counts)
    uppers = np.linspace(hi, 0.0, grid, endpoint=False)[::-1] if hi > 0 else np.array([hi])
    lowers = np.linspace(lo, 0.0, grid, endpoint=False)[::-1] if lo < 0 else np.array([lo])
    best, best_err = (lo, hi), np.inf
    for a in lowers:
        b = uppers[:, None]
        step2 = ((b - a) / (levels - 1)) ** 2
        inside = (centers >= a) & (centers <= b)
        clipped = np.where(centers > b, centers - b, np.where(centers < a, a - centers, 0.0))
        err = (counts * np.where(inside, step2 / 12.0, clipped ** 2)).sum(axis=1)
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (float(a), float(uppers[i])), float(err[i])
    return best


def entropy_range(counts: np.ndarray, lo: float, hi: float, *, levels: int = 256, max_candidates: int = 512) -> tuple[float, float]:
    """Clipping threshold of least KL divergence between the clipped and the quantized
    histogram (TensorRT's int8 calibration, Migacz 2017).

    A one-signed histogram (``lo >= 0``) is searched over ``[lo, t]`` with all ``levels``
    codes; a two-signed one is folded into ``|x|`` and searched with ``levels // 2`` codes per
    sign, the threshold ``t`` clipping both ends to ``[-t, t]`` (inside the observed range).
    """
    counts = _check(counts, lo, hi)
    if lo >= 0 or hi <= 0:
        mirrored = hi <= 0 < -lo
        hist = counts[::-1] if mirrored else counts
        start, width = (-hi if mirrored else lo), (hi - lo) / len(counts)
        t = start + _kl_threshold_bins(hist, levels, max_candidates) * width
        return (-t, -start) if mirrored else (start, t)
    width = (hi - lo) / len(counts)
    centers = lo + (np.arange(len(counts)) + 0.5) * width
    folded = np.bincount(np.minimum((np.abs(centers) / width).astype(np.int64), len(counts) - 1),
                         weights=counts, minlength=int(np.ceil(max(-lo, hi) / width)))
    t = _kl_threshold_bins(folded, levels // 2, max_candidates) * width
    return max(lo, -t), min(hi, t)


def _kl_threshold_bins(hist: np.ndarray, levels: int, max_candidates: int) -> int:
    """Number of leading bins to keep, minimising KL(P || Q) (Migacz's reference algorithm)."""
    n = len(hist)
    if n <= levels or hist.sum() == 0:
        return n
    stride = max(1, (n - levels) // max_candidates)
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        # merge the first i bins into `levels` groups, spread each group's mass over its nonzero bins
        edges = (np.arange(levels + 1) * i) // levels
        group_sum = np.add.reduceat(hist[:i].astype(np.float64), edges[:-1])
        group_nnz = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        per_bin = np.divide(group_sum, group_nnz, out=np.zeros_like(group_sum), where=group_nnz > 0)
        q = np.repeat(per_bin, np.diff(edges)) * nonzero
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q_total = q.sum()
    if q_total == 0:
        return np.inf
    q = q / q_total
    mask = p > 0
    # a bin that P has and Q lacks (the clipped mass landed in an empty bin) costs a large finite amount
    q = np.where(mask & (q == 0), 1e-12, q)
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


def _quantile(counts: np.ndarray, lo: float, hi: float, fraction: float) -> float:
    cdf = np.cumsum(counts) / counts.sum()
    k = int(np.searchsorted(cdf, fraction, side="left"))
    k = min(k, len(counts) - 1)
    below = cdf[k - 1] if k > 0 else 0.0
    inside = (fraction - below) / (cdf[k] - below) if cdf[k] > below else 0.0
    return float(lo + (k + min(max(inside, 0.0), 1.0)) * (hi - lo) / len(counts))


def _check(counts, lo: float, hi: float) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ConfigError(f"counts: expected a non-empty 1-D histogram, got shape {list(counts.shape)}")
    if not lo <= hi:
        raise ConfigError(f"histogram range [{lo}, {hi}] is empty; lo must be <= hi")
    if counts.sum() <= 0:
        raise ConfigError("counts: the histogram is empty; run calibration data through the observer first")
    return counts


__all__ = ["percentile_range", "mse_range", "entropy_range"]
