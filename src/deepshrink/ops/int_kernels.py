"""Integer dot products as x86 int8 kernels compute them: exact, and with int16 pair saturation.

x86 without VNNI has no int8 dot product that accumulates in int32. ONNX Runtime's u8 x s8
GEMM (MLAS, AVX2) therefore runs ``vpmaddubsw``: it multiplies unsigned bytes of A with signed
bytes of B and adds each *adjacent pair* of products into an int16, **saturating** at
[-32768, 32767]; ``vpmaddwd`` then widens the pairs into int32 sums without further loss. A pair
of two full-range products (255 * 127 * 2 = 64,770) overflows; with weights in [-63, 63] a pair is
at most 255 * 63 * 2 = 32,130, and nothing can. VNNI's ``vpdpbusd`` sums four products straight
into int32 and never saturates.

Pairs are adjacent along the reduction axis (k, k + 1), k even, as MLAS packs B.
"""
from __future__ import annotations

import torch

INT16_MIN, INT16_MAX = -32768, 32767


def max_pair_sum(a_max: int, w_absmax: int) -> int:
    """The largest |pair sum| unsigned activations up to ``a_max`` and weights up to ``w_absmax`` can make."""
    return 2 * a_max * w_absmax


def pair_sums(a_u8: torch.Tensor, w_s8: torch.Tensor) -> torch.Tensor:
    """``[N, ceil(K / 2), M]`` pair sums ``a[n, 2i] w[m, 2i] + a[n, 2i+1] w[m, 2i+1]`` of ``a_u8``
    ``[N, K]`` (values 0..255) and ``w_s8`` ``[M, K]`` (values -128..127), as float32 (exact: every
    pair sum is an integer below 2^17)."""
    n, k = a_u8.shape
    if k % 2:
        a_u8 = torch.nn.functional.pad(a_u8, (0, 1))
        w_s8 = torch.nn.functional.pad(w_s8, (0, 1))
    a = a_u8.to(torch.float32).reshape(n, -1, 2).transpose(0, 1)             # [K/2, N, 2]
    w = w_s8.to(torch.float32).reshape(w_s8.shape[0], -1, 2).permute(1, 2, 0)  # [K/2, 2, M]
    return torch.bmm(a, w).transpose(0, 1)                                    # [N, K/2, M]


def can_saturate(a_max: int, w_absmax: int) -> bool:
    return max_pair_sum(a_max, w_absmax) > INT16_MAX


def u8s8_dot(a_u8: torch.Tensor, w_s8: torch.Tensor, *, saturate_pairs: bool, chunk: int = 256) -> tuple[torch.Tensor, int]:
    """``[N, M]`` int64 dot products ``a_u8 @ w_s8.T`` and how many pair sums went out of int16.

    ``saturate_pairs=True`` clamps every pair sum to int16 first, as ``vpmaddubsw`` does; the
    count is the same either way (it is what a saturating kernel would have clipped). When the
    operands' extremes cannot overflow a pair, the exact product is returned without pairing.
    """
    if a_u8.numel() == 0 or not can_saturate(int(a_u8.max()), int(w_s8.abs().max())):
        return a_u8.to(torch.int64) @ w_s8.to(torch.int64).T, 0
    out, clipped = [], 0
    for start in range(0, a_u8.shape[0], chunk):
        pairs = pair_sums(a_u8[start:start + chunk], w_s8)
        clipped += int(((pairs > INT16_MAX) | (pairs < INT16_MIN)).sum())
        if saturate_pairs:
            pairs = pairs.clamp(INT16_MIN, INT16_MAX)
        out.append(pairs.sum(1, dtype=torch.float64).round().to(torch.int64))
    return torch.cat(out), clipped


def pair_peaks(a_u8: torch.Tensor, w_s8: torch.Tensor, *, above: int = INT16_MAX // 2, chunk: int = 256) -> torch.Tensor:
    """``[M]`` int64: per weight row, the largest ``|pair sum|`` the rows of ``a_u8`` ``[N, K]`` form
    with it (what must stay within int16 for ``vpmaddubsw`` not to clip) — exact wherever it is above
    ``above``; elsewhere a bound that is itself at most ``above``. Only the pairs whose bound
    ``max(a) * (|w_k| + |w_k+1|)`` passes ``above`` are computed, which on trained weights is a small
    part of ``N x K/2 x M``."""
    m, k = w_s8.shape
    if k % 2:
        a_u8 = torch.nn.functional.pad(a_u8, (0, 1))
        w_s8 = torch.nn.functional.pad(w_s8, (0, 1))
    a_max = int(a_u8.max()) if a_u8.numel() else 0
    w = w_s8.to(torch.float32).reshape(m, -1, 2)                              # [M, K/2, 2]
    bounds = a_max * w.abs().sum(-1)                                           # [M, K/2]
    danger = bounds > above
    peak = torch.where(danger, torch.zeros_like(bounds), bounds).amax(1) if bounds.numel() else torch.zeros(m)
    if not bool(danger.any()):
        return peak.round().to(torch.int64)
    rows, pairs = danger.nonzero(as_tuple=True)
    w0, w1 = w[rows, pairs, 0], w[rows, pairs, 1]
    a = a_u8.to(torch.float32).reshape(a_u8.shape[0], -1, 2)                  # [N, K/2, 2]
    exact = torch.zeros(len(rows))
    for start in range(0, a.shape[0], chunk):
        block = a[start:start + chunk]
        sums = block[:, pairs, 0] * w0 + block[:, pairs, 1] * w1                # [n, dangerous pairs]: exact integers
        exact = torch.maximum(exact, sums.abs().amax(0))
    peak = peak.scatter_reduce(0, rows, exact, reduce="amax")
    return peak.round().to(torch.int64)
