"""Where the nonzeros of a flattened tensor are: relative-index gaps or a bitmask.

Relative-index coding (Deep Compression, Han et al. 2016, section 3): each stored entry is the
gap since the previous one, in ``index_bits`` bits. A gap too long for the width is bridged by
filler entries. Unlike the paper, a filler is a reserved symbol (the largest, ``2**bits - 1``,
meaning "skip that many positions") rather than an entry holding a padding zero weight, so
fillers cost no value or codebook-index bits and a genuinely stored zero stays unambiguous:

    symbol s < 2**bits - 1   the next stored entry is s positions after the previous one + 1
    symbol 2**bits - 1       advance 2**bits - 1 positions, store nothing

The symbols are entropy-coded (``deepshrink.ops.entropy``). A bitmask (one bit per element)
wins for dense masks. ``encode_positions`` picks the smaller per tensor.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.ops import entropy, rans

MAX_INDEX_BITS = 16


class PositionCoding(str, enum.Enum):
    BITMASK = "bitmask"
    RELATIVE = "relative"


@dataclasses.dataclass(frozen=True)
class EncodedPositions:
    """Positions as stored: ``payload`` plus what the decoder needs besides ``numel``/``nnz``.

    ``count`` is the number of relative-index symbols (fillers included); 0 for a bitmask.
    """

    coding: PositionCoding
    payload: bytes
    index_bits: int | None = None
    count: int = 0


def relative_index_symbols(positions, *, index_bits: int) -> np.ndarray:
    """Gap symbols for strictly increasing flat ``positions``, fillers inserted for long gaps."""
    _check_index_bits(index_bits)
    pos = _as_positions(positions)
    filler = (1 << index_bits) - 1
    gaps = np.diff(pos, prepend=-1) - 1
    fillers = gaps // filler
    out = np.full(int(fillers.sum()) + pos.size, filler, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = gaps % filler
    return out


def positions_from_relative(symbols, *, index_bits: int, numel: int) -> np.ndarray:
    """Inverse of ``relative_index_symbols``; ``ArtifactError`` if they leave ``[0, numel)``."""
    _check_index_bits(index_bits)
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    filler = (1 << index_bits) - 1
    if sym.size and (sym.min() < 0 or sym.max() > filler):
        raise ArtifactError(f"relative index symbols must lie in [0, {filler}] for {index_bits}-bit gaps")
    is_entry = sym != filler
    if sym.size and not is_entry[-1]:
        raise ArtifactError("relative index stream ends in a filler entry, which the encoder never writes")
    pos = (np.cumsum(np.where(is_entry, sym + 1, filler)) - 1)[is_entry]
    if pos.size and pos[-1] >= numel:
        raise ArtifactError(f"relative index stream points at position {int(pos[-1])}, "
                            f"past the tensor's {numel} elements")
    return pos


def bitmask_bytes(positions, numel: int) -> bytes:
    """One bit per element, most significant first, set where an entry is stored."""
    bits = np.zeros(numel, dtype=np.uint8)
    bits[_as_positions(positions, numel)] = 1
    return np.packbits(bits).tobytes()


def positions_from_bitmask(data: bytes, numel: int) -> np.ndarray:
    """Inverse of ``bitmask_bytes``; ``ArtifactError`` on a wrong length or set padding bits."""
    if len(data) != (numel + 7) // 8:
        raise ArtifactError(f"bitmask for {numel} elements needs {(numel + 7) // 8} bytes, got {len(data)}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[numel:].any():
        raise ArtifactError("bitmask has bits set past the tensor's last element")
    return np.flatnonzero(bits[:numel])


def encode_positions(positions, numel: int, *, index_bits: int | None = None) -> EncodedPositions:
    """The smaller of a bitmask and entropy-coded relative indices for these positions.

    ``index_bits`` fixes the gap width; ``None`` picks the width whose symbols have the lowest
    estimated coded size (entropy plus table and coder-state costs), computed from gap
    histograms without materialising the symbols.
    """
    pos = _as_positions(positions, numel)
    if index_bits is None:
        index_bits = _best_index_bits(pos)
    _check_index_bits(index_bits)
    symbols = relative_index_symbols(pos, index_bits=index_bits)
    relative = EncodedPositions(PositionCoding.RELATIVE, entropy.encode(symbols), index_bits, symbols.size)
    if (numel + 7) // 8 < len(relative.payload):
        return EncodedPositions(PositionCoding.BITMASK, bitmask_bytes(pos, numel))
    return relative


def decode_positions(encoded: EncodedPositions, *, numel: int, nnz: int) -> np.ndarray:
    """Flat positions of the ``nnz`` stored entries; ``ArtifactError`` on any inconsistency."""
    if encoded.coding == PositionCoding.BITMASK:
        pos = positions_from_bitmask(encoded.payload, numel)
    else:
        if encoded.index_bits is None or not 1 <= encoded.index_bits <= MAX_INDEX_BITS:
            raise ArtifactError(f"relative index width {encoded.index_bits!r} is outside 1..{MAX_INDEX_BITS}")
        if not nnz <= encoded.count <= max(numel, 0):
            # every symbol advances at least one position inside the tensor
            raise ArtifactError(f"relative index count {encoded.count} is impossible for {nnz} entries "
                                f"in {numel} elements")
        symbols = entropy.decode(encoded.payload, encoded.count)
        pos = positions_from_relative(symbols, index_bits=encoded.index_bits, numel=numel)
    if pos.size != nnz:
        raise ArtifactError(f"positions stream holds {pos.size} entries, header says {nnz}")
    return pos


def _best_index_bits(pos: np.ndarray) -> int:
    gaps = np.diff(pos, prepend=-1) - 1
    best_bits, best_cost = 1, float("inf")
    for bits in range(1, MAX_INDEX_BITS + 1):
        filler = (1 << bits) - 1
        counts = np.bincount(gaps % filler, minlength=filler + 1) if gaps.size else np.zeros(filler + 1, np.int64)
        counts[filler] += int((gaps // filler).sum())
        # entropy + ~24 bits per table entry + the rANS coder's 32-bit state per lane
        cost = (entropy.entropy_bits_from_counts(counts) + 24 * np.count_nonzero(counts)
                + 32 * rans.rans_lanes(int(counts.sum())))
        if cost < best_cost:
            best_bits, best_cost = bits, cost
    return best_bits


def _check_index_bits(index_bits: int) -> None:
    if isinstance(index_bits, bool) or not isinstance(index_bits, int) or not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ConfigError(f"index_bits: {index_bits!r} is outside 1..{MAX_INDEX_BITS}; "
                          f"Deep Compression uses 4 (conv) or 5 (fc), None picks per tensor")


def _as_positions(positions, numel: int | None = None) -> np.ndarray:
    pos = np.asarray(positions).reshape(-1)
    if pos.size and pos.dtype.kind not in "iu":
        raise ConfigError(f"positions: need integer flat indices, got dtype {pos.dtype}")
    pos = pos.astype(np.int64, copy=False)
    if pos.size and (pos[0] < 0 or (np.diff(pos) <= 0).any()):
        raise ConfigError("positions: need strictly increasing non-negative flat indices")
    if numel is not None and pos.size and pos[-1] >= numel:
        raise ConfigError(f"positions: index {int(pos[-1])} is outside a tensor of {numel} elements")
    return pos
