"""Sparse positions: relative-index gaps with fillers, bitmask, and the chooser between them."""
from __future__ import annotations

import numpy as np
import pytest

from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.formats import sparse
from deepshrink.ops import entropy

NUMEL = 300 * 784


def _positions(sparsity: float, seed: int = 0, numel: int = NUMEL) -> np.ndarray:
    return np.flatnonzero(np.random.default_rng(seed).random(numel) >= sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("index_bits", [1, 3, 4, 5, 8, 16])
def test_relative_index_round_trip_is_exact(sparsity, index_bits):
    pos = _positions(sparsity)
    symbols = sparse.relative_index_symbols(pos, index_bits=index_bits)
    assert symbols.size == 0 or symbols.max() < 2**index_bits
    np.testing.assert_array_equal(sparse.positions_from_relative(symbols, index_bits=index_bits, numel=NUMEL), pos)


def test_long_gaps_get_filler_entries():
    # 4-bit gaps: symbol 15 = skip 15 positions; gap 39 before position 40 = 2 fillers + gap 9
    symbols = sparse.relative_index_symbols([0, 40, 41, 56], index_bits=4)
    np.testing.assert_array_equal(symbols, [0, 15, 15, 9, 0, 14])
    # a gap of exactly one filler: position 15 after -1 means 15 skipped = 1 filler, then gap 0
    np.testing.assert_array_equal(sparse.relative_index_symbols([15], index_bits=4), [15, 0])
    # 3-bit gaps before position 100: 100 skipped = 14 fillers of 7, then gap 2
    symbols = sparse.relative_index_symbols([100], index_bits=3)
    np.testing.assert_array_equal(symbols, [7] * 14 + [2])
    np.testing.assert_array_equal(sparse.positions_from_relative(symbols, index_bits=3, numel=101), [100])


def test_bitmask_round_trip_and_padding_check():
    pos = _positions(0.7, numel=1001)
    data = sparse.bitmask_bytes(pos, 1001)
    assert len(data) == 126
    np.testing.assert_array_equal(sparse.positions_from_bitmask(data, 1001), pos)
    with pytest.raises(ArtifactError, match="past the tensor"):
        sparse.positions_from_bitmask(data[:-1] + b"\xff", 1001)
    with pytest.raises(ArtifactError, match="needs 126 bytes"):
        sparse.positions_from_bitmask(data[:-1], 1001)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_chooser_keeps_the_smaller_coding_and_round_trips(sparsity):
    pos = _positions(sparsity, seed=1)
    chosen = sparse.encode_positions(pos, NUMEL)
    relative = entropy.encode(sparse.relative_index_symbols(pos, index_bits=chosen.index_bits or 4))
    assert len(chosen.payload) <= min(len(relative), (NUMEL + 7) // 8)
    np.testing.assert_array_equal(sparse.decode_positions(chosen, numel=NUMEL, nnz=pos.size), pos)


def test_half_dense_positions_take_the_bitmask():
    # 50 % at random: no gap code beats one bit per element, so the bitmask (NUMEL / 8 bytes) wins
    pos = _positions(0.5, seed=4)
    chosen = sparse.encode_positions(pos, NUMEL)
    assert chosen.coding == sparse.PositionCoding.BITMASK and len(chosen.payload) == NUMEL // 8 == 29_400
    np.testing.assert_array_equal(sparse.decode_positions(chosen, numel=NUMEL, nnz=pos.size), pos)


def test_sparse_positions_cost_near_their_entropy():
    # 90 % sparse: gaps are geometric, H = H(0.1) / 0.1 = 4.69 bits per nonzero, 0.47 per element
    pos = _positions(0.9, seed=2)
    chosen = sparse.encode_positions(pos, NUMEL)
    assert chosen.coding == sparse.PositionCoding.RELATIVE
    symbols = sparse.relative_index_symbols(pos, index_bits=chosen.index_bits)
    assert 8 * len(chosen.payload) <= 1.1 * entropy.entropy_bits(symbols)
    assert 8 * len(chosen.payload) / NUMEL < 0.5


def test_fixed_index_bits_are_used():
    pos = _positions(0.9, seed=3)
    assert sparse.encode_positions(pos, NUMEL, index_bits=5).index_bits == 5


@pytest.mark.parametrize("positions", [[3, 3], [5, 2], [-1, 4], [0.5]])
def test_encoder_rejects_bad_positions(positions):
    with pytest.raises(ConfigError):
        sparse.encode_positions(positions, 10)


@pytest.mark.parametrize("index_bits", [0, 17, None, 2.0])
def test_index_bits_must_be_1_to_16(index_bits):
    with pytest.raises(ConfigError, match="index_bits"):
        sparse.relative_index_symbols([1, 2], index_bits=index_bits)


def test_decoder_rejects_inconsistent_streams():
    with pytest.raises(ArtifactError, match="past the tensor"):
        sparse.positions_from_relative([3, 3], index_bits=4, numel=6)
    with pytest.raises(ArtifactError, match="ends in a filler"):
        sparse.positions_from_relative([0, 15], index_bits=4, numel=100)
    with pytest.raises(ArtifactError, match=r"\[0, 15\]"):
        sparse.positions_from_relative([16], index_bits=4, numel=100)
    encoded = sparse.encode_positions([1, 5, 900], 1000, index_bits=2)
    assert encoded.coding == sparse.PositionCoding.RELATIVE
    with pytest.raises(ArtifactError, match="header says 4"):
        sparse.decode_positions(encoded, numel=1000, nnz=4)
    with pytest.raises(ArtifactError, match="impossible"):
        sparse.decode_positions(sparse.EncodedPositions(encoded.coding, encoded.payload, 2, 1001),
                                numel=1000, nnz=3)
