"""Entropy coder: exact round trips, sizes against the Shannon bound, hostile input."""
from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.ops import entropy

N = 300_000


def _streams(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "uniform32": rng.integers(0, 32, N),
        "geometric": np.minimum(rng.geometric(0.3, N) - 1, 30),
        "skewed95": np.where(rng.random(N) < 0.95, 0, rng.integers(1, 32, N)),
        "two_symbols": (rng.random(N) < 0.2).astype(np.int64),
        "wide_alphabet": rng.integers(0, 65536, 20_000),
        "zipf": np.minimum(rng.zipf(1.5, 50_000), 65535),
        "short": np.array([3, 1, 3, 3, 0]),
        "one_symbol": np.full(1000, 7),
        "single": np.array([65535]),
        "empty": np.zeros(0, dtype=np.int64),
    }


STREAMS = _streams(np.random.default_rng(0))


@pytest.mark.parametrize("name", list(STREAMS))
def test_round_trip_is_exact(name):
    symbols = STREAMS[name]
    out = entropy.decode(entropy.encode(symbols), symbols.size)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, symbols)


@pytest.mark.parametrize("method", ["fixed", "huffman", "rans"])
@pytest.mark.parametrize("name", ["geometric", "skewed95", "two_symbols", "short"])
def test_every_method_round_trips(name, method):
    symbols = STREAMS[name]
    np.testing.assert_array_equal(entropy.decode(entropy.encode(symbols, method=method), symbols.size), symbols)


def test_constant_and_empty_streams_take_three_bytes():
    assert len(entropy.encode(STREAMS["one_symbol"])) == 3
    assert len(entropy.encode(STREAMS["empty"])) == 3
    np.testing.assert_array_equal(entropy.decode(entropy.encode([5]), 4), [5, 5, 5, 5])


def test_frequencies_sum_to_the_scale_and_the_remainder_goes_to_the_most_frequent():
    from deepshrink.ops.rans import PROB_SCALE, quantise_frequencies

    s = PROB_SCALE
    freqs = quantise_frequencies(np.array([3, 5, 1]))
    assert freqs.tolist() == [3 * s // 9, s - 3 * s // 9 - s // 9, s // 9]       # floors; the rest to symbol 1
    lifted = quantise_frequencies(np.array([10**9, 1, 1]))                       # rare symbols lifted to 1
    assert lifted.tolist() == [s - 2, 1, 1]


def test_entropy_bits_matches_hand_computed_values():
    assert entropy.entropy_bits([0, 0, 1, 1]) == pytest.approx(4.0)
    assert entropy.entropy_bits([0, 0, 0, 1]) == pytest.approx(3 * math.log2(4 / 3) + 2)
    assert entropy.entropy_bits([]) == 0.0
    assert entropy.entropy_bits([9] * 10) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_huffman_lengths_are_within_one_bit_per_symbol_of_entropy(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 1000, 300) * (rng.random(300) < 0.7)
    lengths = entropy.huffman_code_lengths(counts)
    coded = int(counts @ lengths.astype(np.int64))
    bound = entropy.entropy_bits_from_counts(counts)
    assert bound <= coded <= bound + counts.sum()
    present = counts > 0
    assert (lengths[~present] == 0).all()
    assert sum(2.0 ** -int(l) for l in lengths[present]) == 1.0  # a complete prefix code


def test_code_lengths_are_limited():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, dtype=np.int64)  # optimal Huffman depth would be 39
    lengths = entropy.huffman_code_lengths(counts)
    assert lengths.max() <= entropy.MAX_CODE_LENGTH
    assert sum(2.0 ** -int(l) for l in lengths) == 1.0
    # the fallback (halve counts, rebuild) is not optimal but stays close to the bound
    assert counts @ lengths.astype(np.int64) <= 1.05 * (entropy.entropy_bits_from_counts(counts) + counts.sum())
    short = entropy.huffman_code_lengths(counts[:20], max_length=8)
    assert short.max() <= 8 and sum(2.0 ** -int(l) for l in short) == 1.0


def test_huffman_stream_with_max_length_codes_round_trips():
    # Fibonacci counts make the deepest possible tree; 300k symbols would need 25-bit codes
    fib = [1, 1]
    while sum(fib) < 300_000:
        fib.append(fib[-1] + fib[-2])
    symbols = np.random.default_rng(1).permutation(np.repeat(np.arange(len(fib)), fib))
    assert len(fib) - 1 > entropy.MAX_CODE_LENGTH  # the unlimited tree's depth
    assert entropy.huffman_code_lengths(np.array(fib)).max() <= entropy.MAX_CODE_LENGTH
    data = entropy.encode(symbols, method="huffman")
    np.testing.assert_array_equal(entropy.decode(data, symbols.size), symbols)


@pytest.mark.parametrize("name", ["uniform32", "geometric", "skewed95", "two_symbols"])
def test_large_streams_are_within_1_1x_of_entropy(name):
    symbols = STREAMS[name]
    assert 8 * len(entropy.encode(symbols)) <= 1.1 * entropy.entropy_bits(symbols)


def test_huffman_alone_misses_the_bound_when_one_symbol_dominates():
    # why rANS exists: Huffman cannot spend less than 1 bit per symbol
    symbols = STREAMS["skewed95"]
    assert 8 * len(entropy.encode(symbols, method="huffman")) > 2 * entropy.entropy_bits(symbols)


@pytest.mark.parametrize("name", ["uniform32", "geometric", "skewed95"])
def test_300k_symbols_encode_and_decode_quickly(name):
    symbols = STREAMS[name]
    for method in (None, "huffman"):
        start = time.perf_counter()
        entropy.decode(entropy.encode(symbols, method=method), symbols.size)
        assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("bad", [[-1], [65536], [0.5], np.array([1.0, 2.0])])
def test_encode_rejects_symbols_outside_the_alphabet(bad):
    with pytest.raises(ConfigError):
        entropy.encode(bad)


def test_forced_methods_refuse_streams_they_cannot_code():
    with pytest.raises(ConfigError):
        entropy.encode([1, 2], method="constant")
    with pytest.raises(ConfigError):
        entropy.encode([1, 1], method="rans")
    with pytest.raises(ConfigError):
        entropy.encode([1, 2], method="lzma")


@pytest.mark.parametrize("data, n, message", [
    (b"", 1, "empty"),
    (b"\x09", 1, "unknown mode"),
    (b"\x00\x01", 1, "3 bytes"),
    (b"\x01\x11", 1, "width"),
    (b"\x01\x05\xff", 4, "need 3 bytes"),
    (b"\x02\x00\xff\xff\x00\x00", 1, "table"),
    (b"\x03\x00\x02\x00\x00\x00\x01\x00\x01\x00", 1, "sum to 65536"),
])
def test_decode_names_what_is_wrong(data, n, message):
    with pytest.raises(ArtifactError, match=message):
        entropy.decode(data, n)


def _check_decode(data: bytes, n: int) -> None:
    try:
        out = entropy.decode(data, n)
    except ArtifactError:
        return
    assert out.shape == (n,) and (out.size == 0 or (out.min() >= 0 and out.max() < 65536))


@pytest.mark.timeout(60)
def test_decode_of_random_and_mutated_streams_raises_only_artifact_error():
    rng = random.Random(1234)
    sources = [entropy.encode(STREAMS[name][:64], method=m)
               for name in ("geometric", "skewed95", "short") for m in ("fixed", "huffman", "rans")]
    start = time.perf_counter()
    for _ in range(400):
        _check_decode(bytes(rng.randrange(256) for _ in range(rng.randrange(48))), rng.randrange(80))
    for source in sources:
        n = 64 if len(source) > 20 else 5
        for _ in range(40):
            data = bytearray(source)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            _check_decode(bytes(data), n)
            _check_decode(bytes(data[:rng.randrange(len(data))]), n)
    assert time.perf_counter() - start < 20
