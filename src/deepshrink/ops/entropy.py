"""Entropy coding of integer streams over small alphabets (symbols 0..65535).

``encode`` returns a self-describing stream: a mode byte, the table the decoder needs, then the
coded bits. It picks the smallest of four modes for each stream:

- CONSTANT: one distinct symbol (or none); 3 bytes whatever the length.
- FIXED: every symbol in ``width`` bits, for near-uniform streams where a table does not pay.
- HUFFMAN: canonical Huffman, code lengths limited to ``MAX_CODE_LENGTH`` bits.
- RANS: interleaved rANS (``deepshrink.ops.rans``) for skewed streams: Huffman cannot spend less
  than 1 bit per symbol, which is over 3x the entropy of a 95 %-dominant stream.

``decode`` needs the symbol count, which the caller stores (the container keeps it in its
header). Layout, all integers little-endian, bits packed most-significant first:

    CONSTANT  u8 0, u16 symbol
    FIXED     u8 1, u8 width, packed bits
    HUFFMAN   u8 2, table(u8 code lengths), packed bits
    RANS      u8 3, table(u16 frequencies), u32 state per lane, u16 words
    table     u8 layout, u32 count; layout 0 (dense): count values for symbols 0..count-1;
              layout 1 (sparse): count u16 symbols (increasing), then count values
"""
from __future__ import annotations

import enum
import math
import struct

import numpy as np

from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.ops import rans

MAX_ALPHABET = 1 << 16
MAX_CODE_LENGTH = 24  # a code word plus its bit offset (< 8) fits one 32-bit window
_MAX_RANS_SYMBOLS = 4096  # beyond this the 16-bit probability table loses more than it saves
_DECODE_CHUNK_BITS = 1 << 20  # bounds the decoder's temporary arrays to a few MiB


class _Mode(enum.IntEnum):
    CONSTANT = 0
    FIXED = 1
    HUFFMAN = 2
    RANS = 3


def entropy_bits_from_counts(counts) -> float:
    """Shannon bound, in bits, of a stream with these symbol counts: sum of -log2 p per symbol."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    return float(np.sum(c * np.log2(c.sum() / c)))


def entropy_bits(symbols) -> float:
    """Empirical Shannon bound of ``symbols``: the fewest bits any code of their histogram needs."""
    arr = _as_symbols(symbols)
    return entropy_bits_from_counts(np.bincount(arr)) if arr.size else 0.0


def huffman_code_lengths(counts, *, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length in bits for each symbol (0 for symbols with count 0).

    Lengths are capped at ``max_length``: while the optimal tree is deeper, counts are halved
    (rounding up, so no symbol disappears) and the tree rebuilt; flatter counts give a shallower
    tree and all-equal counts a balanced one. This is a safe fallback, not optimal (package-merge
    is); it only triggers on Fibonacci-like counts over >100k symbols. A lone symbol gets length 1.
    """
    c = np.asarray(counts)
    if c.ndim != 1 or c.size > MAX_ALPHABET or (c.size and (c.dtype.kind not in "iu" or c.min() < 0)):
        raise ConfigError(f"counts: need a 1-D array of at most {MAX_ALPHABET} non-negative integers, "
                          f"got shape {c.shape} dtype {c.dtype}")
    lengths = np.zeros(c.size, dtype=np.uint8)
    present = np.flatnonzero(c)
    if present.size <= 1:
        lengths[present] = 1
        return lengths
    if not 1 <= max_length <= 32 or (1 << max_length) < present.size:
        raise ConfigError(f"max_length={max_length} cannot code {present.size} symbols; "
                          f"use at least {math.ceil(math.log2(present.size))} (and at most 32)")
    weights = c[present].astype(np.int64)
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= max_length:
            break
        weights = (weights + 1) >> 1
    lengths[present] = depth
    return lengths


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of a Huffman tree, built with the two-queue method (ties prefer leaves)."""
    m = weights.size
    order = np.argsort(weights, kind="stable")
    leaf_w = weights[order].tolist()
    node_w: list[int] = []  # internal nodes, created in non-decreasing weight order
    parent = [0] * (2 * m - 1)  # nodes 0..m-1 are leaves in sorted order, m.. internal
    li = ii = 0
    for new in range(m, 2 * m - 1):
        total = 0
        for _ in range(2):
            if li < m and (ii >= len(node_w) or leaf_w[li] <= node_w[ii]):
                parent[li] = new
                total += leaf_w[li]
                li += 1
            else:
                parent[m + ii] = new
                total += node_w[ii]
                ii += 1
        node_w.append(total)
    depth = [0] * (2 * m - 1)
    for node in range(2 * m - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    out = np.empty(m, dtype=np.int64)
    out[order] = depth[:m]
    return out


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical code words: (symbols, lengths, codes), sorted by (length, symbol)."""
    present = np.flatnonzero(lengths)
    lens = lengths[present].astype(np.int64)
    order = np.lexsort((present, lens))
    symbols, lens = present[order], lens[order]
    max_len = int(lens[-1])
    per_length = np.bincount(lens, minlength=max_len + 1)
    per_length[0] = 0
    first_code = np.zeros(max_len + 1, dtype=np.int64)
    code = 0
    for length in range(1, max_len + 1):
        code = (code + int(per_length[length - 1])) << 1
        first_code[length] = code
    first_index = np.cumsum(per_length) - per_length
    codes = first_code[lens] + np.arange(lens.size) - first_index[lens]
    return symbols, lens, codes


METHODS = ("constant", "fixed", "huffman", "rans")


def encode(symbols, *, method: str | None = None) -> bytes:
    """Entropy-code ``symbols`` (ints in [0, 65535], any shape, flattened) into a stream.

    ``method`` forces one of ``METHODS`` (for benchmarks and tests); ``None`` picks the smallest.
    """
    arr = _as_symbols(symbols)
    counts = np.bincount(arr, minlength=1)
    distinct = int(np.count_nonzero(counts))
    if method is None:
        method = _smallest_method(arr, counts, distinct)
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not one of {METHODS} (or None for the smallest)")
    most = {"constant": 1, "fixed": MAX_ALPHABET, "huffman": MAX_ALPHABET, "rans": _MAX_RANS_SYMBOLS}[method]
    least = 2 if method in ("huffman", "rans") else 0
    if not least <= distinct <= most:
        raise ConfigError(f"method={method!r} codes {least}..{most} distinct symbols, got {distinct}; "
                          f"use method=None")
    if method == "constant":
        return struct.pack("<BH", _Mode.CONSTANT, int(np.argmax(counts)))
    if method == "fixed":
        width = max(1, int(arr.max()).bit_length()) if arr.size else 1
        return struct.pack("<BB", _Mode.FIXED, width) + _pack_bits(arr, np.full(arr.size, width))
    if method == "huffman":
        lengths = huffman_code_lengths(counts)
        symbols_sorted, _, codes = _canonical(lengths)
        code_of = np.zeros(lengths.size, dtype=np.int64)
        code_of[symbols_sorted] = codes
        return (bytes([_Mode.HUFFMAN]) + _pack_table(lengths, np.uint8)
                + _pack_bits(code_of[arr], lengths.astype(np.int64)[arr]))
    freq = _rans_frequencies(counts)
    states, words = rans.rans_encode(arr, freq, np.cumsum(freq) - freq)
    return (bytes([_Mode.RANS]) + _pack_table(freq, np.uint16)
            + states.astype("<u4").tobytes() + words.astype("<u2").tobytes())


def _smallest_method(arr: np.ndarray, counts: np.ndarray, distinct: int) -> str:
    """The method with the fewest bytes: exact for fixed and Huffman, within a few bytes per
    lane for rANS (its cost is the cross-entropy against its quantised frequencies)."""
    if distinct <= 1:
        return "constant"
    width = max(1, int(arr.max()).bit_length())
    lengths = huffman_code_lengths(counts)
    sizes = {"fixed": 2 + (arr.size * width + 7) // 8,
             "huffman": 1 + _table_size(lengths, 1) + (int(counts @ lengths.astype(np.int64)) + 7) // 8}
    if distinct <= _MAX_RANS_SYMBOLS:
        freq = _rans_frequencies(counts)
        present = np.flatnonzero(counts)
        cross_bits = float(np.sum(counts[present] * np.log2(rans.PROB_SCALE / freq[present])))
        sizes["rans"] = 1 + _table_size(freq, 2) + 4 * rans.rans_lanes(arr.size) + 2 * math.ceil(cross_bits / 16)
    return min(sizes, key=sizes.get)


def _rans_frequencies(counts: np.ndarray) -> np.ndarray:
    present = np.flatnonzero(counts)
    freq = np.zeros(counts.size, dtype=np.int64)
    freq[present] = rans.quantise_frequencies(counts[present])
    return freq


def decode(data: bytes, n: int) -> np.ndarray:
    """Inverse of ``encode``: the ``n`` symbols of ``data`` as int64.

    Raises ``ArtifactError`` for any stream ``encode`` could not have produced. ``n`` comes
    from the caller's own (already bounded) header: a constant stream of any length is 3 bytes.
    """
    data = bytes(data)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ArtifactError(f"entropy stream: symbol count must be a non-negative integer, got {n!r}")
    n = int(n)
    if not data:
        raise ArtifactError("entropy stream: empty, expected at least the 1-byte mode tag")
    mode = data[0]
    if mode == _Mode.CONSTANT:
        if len(data) != 3:
            raise ArtifactError(f"entropy stream: constant mode is 3 bytes, got {len(data)}")
        return np.full(n, struct.unpack_from("<H", data, 1)[0], dtype=np.int64)
    if mode == _Mode.FIXED:
        if len(data) < 2 or not 1 <= data[1] <= 16:
            raise ArtifactError("entropy stream: fixed mode needs a width byte in 1..16")
        return _unpack_fixed(data[2:], data[1], n)
    if mode == _Mode.HUFFMAN:
        lengths, offset = _unpack_table(data, 1, np.uint8)
        return _decode_huffman(lengths, data[offset:], n)
    if mode == _Mode.RANS:
        freq, offset = _unpack_table(data, 1, np.uint16)
        return _decode_rans(freq.astype(np.int64), data[offset:], n)
    raise ArtifactError(f"entropy stream: unknown mode {mode}; this deepshrink knows modes 0..3")


def _as_symbols(symbols) -> np.ndarray:
    arr = np.asarray(symbols)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iub":
        raise ConfigError(f"symbols: need integers in [0, {MAX_ALPHABET - 1}], got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= MAX_ALPHABET:
        raise ConfigError(f"symbols: need integers in [0, {MAX_ALPHABET - 1}], got range [{lo}, {hi}]")
    return arr


def _pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate the low ``widths[i]`` bits of each ``values[i]``, MSB first, zero-padded."""
    widths = widths.astype(np.int64)
    ends = np.cumsum(widths)
    total = int(ends[-1]) if ends.size else 0
    bits = np.zeros(total, dtype=np.uint8)
    starts = ends - widths
    for k in range(int(widths.max()) if widths.size else 0):  # one pass per bit plane
        has = widths > k
        bits[starts[has] + k] = (values[has] >> (widths[has] - 1 - k)) & 1
    return np.packbits(bits).tobytes()


def _unpack_fixed(payload: bytes, width: int, n: int) -> np.ndarray:
    expected = (n * width + 7) // 8
    if len(payload) != expected:
        raise ArtifactError(f"entropy stream: {n} symbols of {width} bits need {expected} bytes, "
                            f"payload has {len(payload)}")
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[:n * width].reshape(n, width)
    out = np.zeros(n, dtype=np.int64)
    for k in range(width):
        out = (out << 1) | bits[:, k]
    return out


def _table_size(values: np.ndarray, itemsize: int) -> int:
    present = np.count_nonzero(values)
    return 5 + min(values.size * itemsize, present * (2 + itemsize))


def _pack_table(values: np.ndarray, dtype) -> bytes:
    itemsize = np.dtype(dtype).itemsize
    present = np.flatnonzero(values)
    if values.size * itemsize <= present.size * (2 + itemsize):
        return struct.pack("<BI", 0, values.size) + values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return (struct.pack("<BI", 1, present.size) + present.astype("<u2").tobytes()
            + values[present].astype(np.dtype(dtype).newbyteorder("<")).tobytes())


def _unpack_table(data: bytes, offset: int, dtype) -> tuple[np.ndarray, int]:
    """(values indexed by symbol, offset after the table); sizes checked before reading."""
    itemsize = np.dtype(dtype).itemsize
    if len(data) < offset + 5:
        raise ArtifactError(f"entropy stream: truncated at byte {len(data)} inside the table header")
    layout, count = struct.unpack_from("<BI", data, offset)
    offset += 5
    if layout not in (0, 1) or count > MAX_ALPHABET:
        raise ArtifactError(f"entropy stream: bad table (layout {layout}, {count} entries; "
                            f"layouts are 0/1, at most {MAX_ALPHABET} entries)")
    need = count * itemsize if layout == 0 else count * (2 + itemsize)
    if len(data) < offset + need:
        raise ArtifactError(f"entropy stream: table says {need} bytes, only {len(data) - offset} left")
    if layout == 0:
        values = np.frombuffer(data, np.dtype(dtype).newbyteorder("<"), count, offset).astype(np.int64)
        return values, offset + need
    symbols = np.frombuffer(data, "<u2", count, offset).astype(np.int64)
    vals = np.frombuffer(data, np.dtype(dtype).newbyteorder("<"), count, offset + 2 * count)
    if count and (np.diff(symbols) <= 0).any():
        raise ArtifactError("entropy stream: sparse table symbols are not strictly increasing")
    values = np.zeros(int(symbols[-1]) + 1 if count else 0, dtype=np.int64)
    values[symbols] = vals
    return values, offset + need


def _decode_huffman(lengths: np.ndarray, payload: bytes, n: int) -> np.ndarray:
    present = np.flatnonzero(lengths)
    if present.size < 2 or lengths.max() > MAX_CODE_LENGTH:
        raise ArtifactError(f"entropy stream: Huffman table needs >= 2 codes of <= {MAX_CODE_LENGTH} bits")
    kraft = int(np.sum(1 << (MAX_CODE_LENGTH - lengths[present])))
    if kraft != 1 << MAX_CODE_LENGTH:
        raise ArtifactError("entropy stream: Huffman code lengths do not form a complete prefix code")
    total_bits = 8 * len(payload)
    if n > total_bits:
        raise ArtifactError(f"entropy stream: {n} Huffman symbols cannot fit in {len(payload)} bytes")
    if n == 0:
        if payload:
            raise ArtifactError(f"entropy stream: 0 symbols but {len(payload)} payload bytes")
        return np.zeros(0, dtype=np.int64)
    symbols, lens, codes = _canonical(lengths)
    max_len = int(lens[-1])
    buf = np.frombuffer(payload + bytes(4), dtype=np.uint8).astype(np.uint32)
    words = (buf[:-3] << 24) | (buf[1:-2] << 16) | (buf[2:-1] << 8) | buf[3:]
    # Code length at every bit offset, vectorised: the next max_len bits, left-aligned, lie
    # below the left-aligned end of the first length whose code range contains them.
    level_lens = np.unique(lens)
    last_of_level = np.searchsorted(lens, level_lens, side="right") - 1
    level_end = (codes[last_of_level] + 1) << (max_len - level_lens)
    length_at = np.empty(total_bits, dtype=np.uint8)
    for lo in range(0, total_bits, _DECODE_CHUNK_BITS):
        pos = np.arange(lo, min(total_bits, lo + _DECODE_CHUNK_BITS), dtype=np.int64)
        length_at[pos] = level_lens[np.searchsorted(level_end, _windows(words, pos, max_len), side="right")]
    # Walking the chain of code starts is inherently serial; bytes indexing keeps it cheap.
    step = length_at.tobytes()
    starts_list = []
    p = 0
    for i in range(n):
        if p >= total_bits:
            raise ArtifactError(f"entropy stream: Huffman payload ends after {i} of {n} symbols")
        starts_list.append(p)
        p += step[p]
    if p > total_bits or (p + 7) // 8 != len(payload):
        raise ArtifactError(f"entropy stream: {n} Huffman symbols use {p} bits, "
                            f"payload has {len(payload)} bytes")
    starts = np.array(starts_list, dtype=np.int64)
    start_lens = length_at[starts].astype(np.int64)
    code = _windows(words, starts, max_len) >> (max_len - start_lens)
    first_of_level = np.searchsorted(lens, start_lens, side="left")
    return symbols[first_of_level + code - codes[first_of_level]]


def _windows(words: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` bits starting at each bit offset ``pos`` (width + 7 <= 32)."""
    shifted = words[pos >> 3] << (pos & 7).astype(np.uint32)
    return (shifted >> np.uint32(32 - width)).astype(np.int64)


def _decode_rans(freq: np.ndarray, payload: bytes, n: int) -> np.ndarray:
    present = np.flatnonzero(freq)
    if present.size < 2 or int(freq.sum()) != rans.PROB_SCALE:
        raise ArtifactError(f"entropy stream: rANS frequencies must cover >= 2 symbols and sum to "
                            f"{rans.PROB_SCALE}, got {present.size} symbols summing to {int(freq.sum())}")
    lanes = rans.rans_lanes(n)
    if len(payload) < 4 * lanes or (len(payload) - 4 * lanes) % 2:
        raise ArtifactError(f"entropy stream: rANS payload of {len(payload)} bytes does not hold "
                            f"{lanes} lane states plus whole 16-bit words")
    if n == 0:
        raise ArtifactError("entropy stream: rANS stream for 0 symbols")
    states = np.frombuffer(payload, "<u4", lanes).astype(np.uint32)
    words = np.frombuffer(payload, "<u2", (len(payload) - 4 * lanes) // 2, 4 * lanes).astype(np.uint16)
    cum = np.cumsum(freq) - freq
    slot_symbol = np.repeat(np.arange(freq.size, dtype=np.int64), freq)
    return rans.rans_decode(states, words, freq, cum, slot_symbol, n)
