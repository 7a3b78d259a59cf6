"""Interleaved rANS: near-entropy coding when one symbol dominates (p > 0.5), where Huffman's
one-bit-per-symbol floor is far above the Shannon bound (a 95 %-zero stream has 0.29 bits of
entropy per symbol; Huffman spends 1).

Byte-wise rANS (32-bit state, 16-bit renormalisation words, 16-bit probabilities, as in
ryg_rans' ``rans_word``) is serial per stream, so the symbols are dealt round-robin to
``lanes`` independent states and numpy advances all lanes in one step. Words are stored in
the order the decoder consumes them (step-major, lane-minor), so no per-lane lengths are
needed. The lane count is a pure function of the symbol count, which bounds the decoder's
Python loop to ``n / lanes`` steps whatever the stream says. Every encoder lane starts in
state ``RANS_L``; a decoder that does not end there, or leaves words unread, was given a
corrupted stream.
"""
from __future__ import annotations

import numpy as np

from deepshrink.core.errors import ArtifactError

PROB_BITS = 16
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16
_WORD_MASK = 0xFFFF


def rans_lanes(n: int) -> int:
    """Lanes used for ``n`` symbols: about 4096 symbols per lane, 1 to 4096 lanes."""
    return int(min(4096, max(1, n // 4096)))


def quantise_frequencies(counts: np.ndarray) -> np.ndarray:
    """Scale positive ``counts`` to integer frequencies >= 1 that sum to exactly ``PROB_SCALE``."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size < 2 or counts.size > PROB_SCALE // 2 or (counts <= 0).any():
        raise ValueError(f"need 2..{PROB_SCALE // 2} positive counts, got {counts.size}")
    freqs = np.maximum(1, counts * PROB_SCALE // int(counts.sum()))
    excess = int(freqs.sum()) - PROB_SCALE
    if excess < 0:
        # the floor's remainder goes to the most frequent symbol, where it costs least
        freqs[int(np.argmax(counts))] -= excess
    while excess > 0:
        # symbols lifted to frequency 1 overshot the scale: take it back from the largest
        top = int(np.argmax(freqs))
        take = min(excess, int(freqs[top]) - 1)
        freqs[top] -= take
        excess -= take
    return freqs


def rans_encode(symbols: np.ndarray, freq: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``symbols`` given per-symbol tables ``freq``/``cum`` (indexed by symbol).

    Returns (final states, uint32 per lane; words, uint16 in decoder order).
    """
    n = symbols.size
    lanes = rans_lanes(n)
    steps = -(-n // lanes)
    f_all = freq[symbols].astype(np.uint64)
    c_all = cum[symbols].astype(np.uint64)
    x = np.full(lanes, RANS_L, dtype=np.uint64)
    chunks: list[np.ndarray] = [np.zeros(0, np.uint16)] * steps
    for t in range(steps - 1, -1, -1):
        lo = t * lanes
        active = min(lanes, n - lo)
        f = f_all[lo:lo + active]
        xa = x[:active]
        emit = xa >= (f << np.uint64(16))
        chunks[t] = (xa[emit] & np.uint64(_WORD_MASK)).astype(np.uint16)
        xa = np.where(emit, xa >> np.uint64(16), xa)
        x[:active] = ((xa // f) << np.uint64(PROB_BITS)) + xa % f + c_all[lo:lo + active]
    words = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)
    return x.astype(np.uint32), words


def rans_decode(states: np.ndarray, words: np.ndarray, freq: np.ndarray, cum: np.ndarray,
                slot_symbol: np.ndarray, n: int) -> np.ndarray:
    """Inverse of ``rans_encode``; ``slot_symbol`` maps each of the PROB_SCALE slots to its symbol."""
    lanes = rans_lanes(n)
    if states.size != lanes:
        raise ArtifactError(f"rANS stream: {states.size} lane states for {n} symbols, expected {lanes}")
    x = states.astype(np.uint64)
    words64 = words.astype(np.uint64)
    freq64 = freq.astype(np.uint64)
    cum64 = cum.astype(np.uint64)
    out = np.empty(n, dtype=np.int64)
    read = 0
    for lo in range(0, n, lanes):
        active = min(lanes, n - lo)
        xa = x[:active]
        slot = xa & np.uint64(_WORD_MASK)
        s = slot_symbol[slot]
        out[lo:lo + active] = s
        xa = freq64[s] * (xa >> np.uint64(PROB_BITS)) + slot - cum64[s]
        need = xa < np.uint64(RANS_L)
        k = int(np.count_nonzero(need))
        if k:
            if read + k > words64.size:
                raise ArtifactError(f"rANS stream: truncated after {words64.size} words at symbol {lo}")
            xa[need] = (xa[need] << np.uint64(16)) | words64[read:read + k]
            read += k
        x[:active] = xa
    if read != words64.size or (x != RANS_L).any():
        raise ArtifactError(
            f"rANS stream: corrupted (read {read} of {words64.size} words and the final states "
            f"are not the encoder's initial state)")
    return out
