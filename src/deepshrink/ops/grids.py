"""Uniform grids hidden in float weights: which rows are integer multiples of one float32 scale.

A weight that low-bit training or weight-only quantization left on a grid (``float32(code) *
scale``, symmetric codes) is stored as its float values by PyTorch and by exporters. These
functions find the codes and scales again, exactly (bit for bit), so a file can store the codes
(``deploy.onnx_storage``) and an int8 quantizer can keep the grid instead of rounding the weight
onto another one (``quantization.observers.GridPreservingWeightObserver``). Numpy only.
"""
from __future__ import annotations

import numpy as np

MAX_CODE = 127   # int8's symmetric range


GROUPS = (256, 128, 64, 32, 16)   # groupwise grids tried along a 2-D weight's rows, fewest scales first


def grid_codes(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codes, scales)`` with ``float32(codes) * scales == weight`` exactly once ``codes`` is
    reshaped to the weight's shape, codes in ``[-MAX_CODE, MAX_CODE]``: one float32 scale per slice of axis
    0; for a 2-D weight also per column, or per group of ``GROUPS`` consecutive weights of a row
    (codes ``[rows, groups, size]``, scales ``[rows, groups, 1]``). None when the weight is on no
    such grid."""
    layouts = []
    if weight.ndim >= 2:
        layouts.append(weight)
    if weight.ndim == 2:
        layouts.append(weight.T)
        layouts += [weight.reshape(weight.shape[0], -1, g) for g in GROUPS if weight.shape[1] % g == 0 and weight.shape[1] > g]
    for i, layout in enumerate(layouts):
        found = row_grids(layout.reshape(-1, layout.shape[-1]) if layout.ndim == 3 else layout.reshape(layout.shape[0], -1))
        if found is None:
            continue
        codes, scales = found
        if layout.ndim == 3:   # groups: scales per (row, group)
            return codes.reshape(layout.shape), scales.reshape(*layout.shape[:2], 1)
        if i == 1:             # per column of a 2-D weight
            return codes.reshape(layout.shape).T, scales.reshape(1, -1)
        return codes.reshape(weight.shape), scales.reshape(-1, *([1] * (weight.ndim - 1)))
    return None


def row_grids(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per row of a 2-D array, the smallest largest-code ``m`` (1..``MAX_CODE``) with every ``|w| / max|w| * m`` an
    integer and a float32 scale next to ``max|w| / m`` that rebuilds the row bit for bit (the
    smallest, so that a row on a 4-bit grid gets codes that fit 4 bits)."""
    peak = np.abs(rows).max(axis=1)
    live = np.flatnonzero(peak > 0)
    if live.size and not _on_some_grid(np.abs(rows[live[:1]]) / peak[live[:1], None]):
        return None   # the first row decides cheaply for plain float weights
    scales = np.ones(len(rows), dtype=np.float32)
    codes = np.zeros(rows.shape, dtype=np.int32)
    undecided = live
    for m in range(1, MAX_CODE + 1):
        if undecided.size == 0:
            break
        part, top = rows[undecided], peak[undecided]
        scaled = np.abs(part) / top[:, None] * m
        near = np.abs(scaled - np.rint(scaled)).max(axis=1) < 1e-3
        found = np.zeros(len(undecided), dtype=bool)
        base = (top / np.float32(m)).astype(np.float32)
        for scale in (base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(0))):
            q = np.rint(part / scale[:, None])
            exact = near & ~found & (np.abs(q).max(axis=1) <= MAX_CODE) & (q.astype(np.float32) * scale[:, None] == part).all(axis=1)
            scales[undecided[exact]], codes[undecided[exact]] = scale[exact], q[exact]
            found |= exact
        undecided = undecided[~found]
    return (codes, scales) if undecided.size == 0 else None


def _on_some_grid(ratio: np.ndarray) -> bool:
    if ratio.size == 0:
        return True
    scaled = ratio * np.arange(1, MAX_CODE + 1, dtype=np.float64)[:, None, None]
    return bool((np.abs(scaled - np.rint(scaled)).max(axis=(1, 2)) < 1e-3).any())
