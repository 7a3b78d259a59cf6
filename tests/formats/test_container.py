"""The .dsk container: exact round trips, sizes, and refusal of corrupted or hostile files."""
from __future__ import annotations

import json
import random
import struct
import time
import zlib

import pytest
import torch

from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.formats.container import (RecordKind, TensorRecord, decode_bytes, encode_records,
                                          read_container, record_for, size_breakdown, write_container)

# the documented layout, restated so the tests double as its spec
PREAMBLE = struct.Struct("<8sHHIQ")
MAGIC = b"\x89DSK\r\n\x1a\n"


def _split(data: bytes) -> tuple[dict, bytes]:
    _, _, _, header_len, payload_len = PREAMBLE.unpack_from(data)
    header = json.loads(data[PREAMBLE.size:PREAMBLE.size + header_len])
    return header, data[PREAMBLE.size + header_len:PREAMBLE.size + header_len + payload_len]


def _assemble(header, payload: bytes, *, version: int = 1) -> bytes:
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = PREAMBLE.pack(MAGIC, version, 0, len(header_bytes), len(payload)) + header_bytes + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _reseal(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def _pruned(shape, sparsity: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    return torch.where(torch.rand(shape, generator=g) >= sparsity, w, torch.zeros((), dtype=dtype))


def _shared(shape, sparsity: float, bits: int, seed: int = 0):
    """(tensor, mask, codebook, indices): a pruned tensor whose kept weights share 2**bits values."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.linspace(-1.0, 1.0, 2**bits) + 0.01  # no exact zero: pruning is the mask's job
    indices = torch.randint(0, 2**bits, shape, generator=g)
    mask = torch.rand(shape, generator=g) >= sparsity
    return torch.where(mask, codebook[indices], torch.zeros(())), mask, codebook, indices


def _round_trip(records, metadata=None):
    tensors, meta = decode_bytes(encode_records(records, metadata))
    return tensors, meta


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _small_file() -> bytes:
    """Every kind and every entropy mode (constant, fixed, Huffman, rANS) in about 1.3 KiB."""
    t, mask, cb, idx = _shared((16, 32), 0.95, 2, seed=5)
    _, _, emb_cb, emb_idx = _shared((20, 20), 0.0, 2, seed=3)
    emb_idx = torch.where(torch.arange(400).reshape(20, 20) % 11 == 0, emb_idx, 0)  # skewed: rANS
    # dyadic index frequencies (1/2, 1/4, ...): Huffman's best case
    head_idx = torch.tensor([0] * 100 + [1] * 50 + [2] * 25 + [3] * 13 + [4] * 6 + [5] * 6).reshape(10, 20)
    head_cb = torch.linspace(-0.5, 0.5, 6)
    records = [record_for("fc.weight", t, mask=mask, codebook=cb, indices=idx, kind="sparse_codebook",
                          index_bits=4),
               record_for("fc.bias", torch.randn(8, generator=torch.Generator().manual_seed(1))),
               record_for("conv.weight", _pruned((4, 12), 0.7, seed=2), kind="sparse"),
               record_for("emb", emb_cb[emb_idx], codebook=emb_cb, indices=emb_idx, kind="codebook"),
               record_for("head.weight", head_cb[head_idx], codebook=head_cb, indices=head_idx),
               record_for("zeros", torch.zeros(40, 40), kind="sparse"),
               record_for("bn.num_batches_tracked", torch.tensor(7))]
    return encode_records(records, {"arch": {"name": "tiny", "layers": [8, 16]}})


SMALL = _small_file()


def test_small_file_exercises_every_entropy_mode():
    # the corruption and fuzz tests below only reach the decoders this file uses
    header, payload = _split(SMALL)
    modes, offset = set(), 0
    for record in header["records"]:
        for role, length in record["streams"]:
            coded = role == "indices" or (role == "positions" and record["positions"]["coding"] == "relative")
            if coded:
                modes.add(payload[offset])
            offset += length
    assert modes == {0, 1, 2, 3} and len(SMALL) < 1500


@pytest.mark.parametrize("sparsity, kind", [(0.0, "dense"), (0.5, None), (0.9, "sparse"),
                                            (0.999, "sparse"), (1.0, "sparse")])
def test_sparse_tensors_round_trip_exactly(sparsity, kind):
    t = _pruned((300, 784), sparsity, seed=1)
    r = record_for("w", t)
    if kind:
        assert r.kind.value == kind
    _assert_same(_round_trip([r])[0]["w"], t)


@pytest.mark.parametrize("kind", list(RecordKind))
def test_every_kind_round_trips_exactly(kind):
    t, mask, cb, idx = _shared((64, 100), 0.8, 5, seed=2)
    r = record_for("w", t, mask=mask, codebook=cb, indices=idx, kind=kind)
    assert r.kind == kind
    _assert_same(r.to_tensor(), t)
    _assert_same(_round_trip([r])[0]["w"], t)


def test_float_masks_from_torch_prune_are_accepted():
    t = _pruned((20, 30), 0.0, seed=8)
    mask = (torch.rand(20, 30, generator=torch.Generator().manual_seed(8)) > 0.8).float()
    r = record_for("w", t * mask, mask=mask)
    assert r.kind == RecordKind.SPARSE and r.nnz == int(mask.sum())
    _assert_same(_round_trip([r])[0]["w"], t * mask)


def test_unpruned_codebook_tensor_picks_the_codebook_kind():
    t, mask, cb, idx = _shared((120, 84), 0.0, 4, seed=3)
    r = record_for("w", t, codebook=cb, indices=idx)
    assert r.kind == RecordKind.CODEBOOK
    _assert_same(_round_trip([r])[0]["w"], t)


@pytest.mark.parametrize("index_bits", [1, 4, 5, 8])
def test_fixed_index_bits_round_trip(index_bits):
    t, mask, cb, idx = _shared((50, 60), 0.95, 3, seed=4)
    r = record_for("w", t, mask=mask, codebook=cb, indices=idx, index_bits=index_bits, kind="sparse_codebook")
    _assert_same(_round_trip([r])[0]["w"], t)


def test_mixed_records_dtypes_and_metadata_round_trip():
    g = torch.Generator().manual_seed(6)
    state = {
        "fc.weight": _pruned((30, 40), 0.9, seed=6),
        "fc.bias": torch.randn(30, generator=g),
        "half": _pruned((17, 3), 0.5, dtype=torch.float16),
        "brain": _pruned((5, 7), 0.6, dtype=torch.bfloat16),
        "double": torch.randn(4, 4, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(123, dtype=torch.int64),
        "flags": torch.rand(9, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 0.0, -float("inf"), 1e-45]),
    }
    metadata = {"arch": {"name": "lenet-300-100", "layers": [784, 300, 100, 10]}, "note": "ünïcode"}
    tensors, meta = _round_trip(state, metadata)
    assert list(tensors) == list(state) and meta == metadata
    for name, t in state.items():
        if name == "special":
            assert torch.equal(tensors[name].view(torch.int32), t.view(torch.int32))  # NaN and -0.0 bits
        else:
            _assert_same(tensors[name], t)


def test_write_and_read_a_file(tmp_path):
    t, mask, cb, idx = _shared((40, 30), 0.9, 5)
    path = write_container(tmp_path / "sub" / "model.dsk",
                           [record_for("w", t, mask=mask, codebook=cb, indices=idx)], {"arch": "x"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.dsk"]  # no temporary left behind
    tensors, meta = read_container(path)
    _assert_same(tensors["w"], t)
    assert meta == {"arch": "x"}
    assert size_breakdown(path) == size_breakdown(path.read_bytes())
    with pytest.raises(ArtifactError, match="cannot read"):
        read_container(tmp_path / "missing.dsk")


def test_deep_compression_layer_is_over_15x_smaller_and_near_its_entropy():
    # LeNet-300-100's first layer, 90 % pruned, 5-bit shared weights (Deep Compression, Table 2)
    t, mask, cb, idx = _shared((300, 784), 0.9, 5, seed=7)
    data = encode_records([record_for("fc1.weight", t, mask=mask, codebook=cb, indices=idx)])
    assert 4 * t.numel() / len(data) >= 15
    rows = size_breakdown(data)
    assert sum(row["total_bits"] for row in rows) == 8 * len(data)
    layer = rows[0]
    assert layer["coded_bits"] <= 1.1 * layer["entropy_bound_bits"]
    assert layer["codebook_bits"] == 32 * 32 + (32 if layer["kind"] == "codebook" else 0)
    forced = encode_records([record_for("fc1.weight", t, mask=mask, codebook=cb, indices=idx,
                                        kind="sparse_codebook", index_bits=5)])
    assert 4 * t.numel() / len(forced) >= 15
    _assert_same(decode_bytes(forced)[0]["fc1.weight"], t)


def test_size_breakdown_accounts_for_every_byte():
    rows = size_breakdown(SMALL)
    assert [row["name"] for row in rows[:-1]] == list(decode_bytes(SMALL)[0])
    assert rows[-1]["kind"] == "file"
    assert sum(row["total_bits"] for row in rows) == 8 * len(SMALL)
    for row in rows[:-1]:
        streams = row["values_bits"] + row["positions_bits"] + row["codebook_bits"] + row["indices_bits"]
        assert row["total_bits"] == streams + row["header_bits"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=torch.ones(3, 4, dtype=torch.bool)), "mask must be"),
    (dict(mask=torch.full((4, 5), 0.5)), "mask must be"),
    (dict(mask=torch.zeros(4, 5, dtype=torch.bool)), "outside the mask are nonzero"),
    (dict(codebook=torch.tensor([1.0])), "both codebook and indices"),
    (dict(codebook=torch.tensor([0.5, 1.0]), indices=torch.zeros(4, 5, dtype=torch.long)), "differs"),
    (dict(codebook=torch.tensor([0.5]), indices=torch.ones(4, 5, dtype=torch.long)), r"\[0, 1\)"),
    (dict(kind="codebook"), "needs a codebook"),
    (dict(kind="huffman"), "not one of"),
    (dict(index_bits=20), "index_bits"),
])
def test_record_for_names_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        record_for("layer1", _pruned((4, 5), 0.0), **kwargs)


def test_encode_rejects_duplicates_bad_metadata_and_dtypes():
    r = record_for("w", torch.ones(3))
    with pytest.raises(ConfigError, match="twice"):
        encode_records([r, r])
    with pytest.raises(ConfigError, match="metadata"):
        encode_records([r], {"x": float("nan")})
    with pytest.raises(ConfigError, match="not storable"):
        record_for("c", torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ConfigError, match="values must be"):
        TensorRecord("w", (3,), "float32", "dense", values=torch.ones(2))


@pytest.mark.parametrize("data, message", [
    (b"", "not a .dsk file"),
    (b"PK\x03\x04" + bytes(40), "not a .dsk file"),
    (SMALL[:5], "truncated at byte 5"),
    (SMALL[:100], "truncated at byte 100"),
    (SMALL + b"\x00", "1 unexpected bytes"),
    (SMALL[:8] + b"\x02" + SMALL[9:], "unsupported .dsk format version 2"),
    (SMALL[:-10] + bytes([SMALL[-10] ^ 1]) + SMALL[-9:], "checksum mismatch"),
    (_assemble(b"{not json", b""), "not valid JSON"),
    (_assemble(b"[" * 100_000 + b"]" * 100_000, b""), "not valid JSON"),
    (_assemble({"records": {}}, b""), "'records' list"),
])
def test_decode_names_what_is_wrong(data, message):
    with pytest.raises(ArtifactError, match=message):
        decode_bytes(data)


def _edited(edit) -> bytes:
    header, payload = _split(SMALL)
    payload = edit(header, payload) or payload
    return _assemble(header, payload)


@pytest.mark.parametrize("edit, message", [
    (lambda h, p: h["records"][1]["streams"].__setitem__(0, ["values", 36]), "32 bytes\), stream has 36"),
    (lambda h, p: h["records"][1]["streams"].__setitem__(0, ["values", 10**6]), "payload has"),
    (lambda h, p: p + b"\x00", "payload has"),
    (lambda h, p: h["records"][1].__setitem__("shape", [9]), "stream has 32 bytes"),
    (lambda h, p: h["records"][1].__setitem__("shape", [2**20, 2**20]), "over the limit"),
    (lambda h, p: h["records"][0].__setitem__("nnz", 5), "header says 5"),
    (lambda h, p: h["records"][0].__setitem__("codebook_size", 1), "codebook"),
    (lambda h, p: h["records"][0].__setitem__("kind", "pickle"), "'kind'"),
    (lambda h, p: h["records"][6].__setitem__("name", "fc.bias"), "twice"),
])
def test_consistent_checksum_but_inconsistent_header_is_refused(edit, message):
    with pytest.raises(ArtifactError, match=message):
        decode_bytes(_edited(edit))


def test_max_elements_is_enforced_before_decoding():
    with pytest.raises(ArtifactError, match="over the limit"):
        decode_bytes(SMALL, max_elements=100)


def test_flipping_any_byte_is_detected():
    for pos in range(len(SMALL)):
        for flip in (0x01, 0x80, 0xFF):
            data = SMALL[:pos] + bytes([SMALL[pos] ^ flip]) + SMALL[pos + 1:]
            with pytest.raises(ArtifactError):
                decode_bytes(data)


def test_truncation_at_every_length_is_detected():
    for length in range(len(SMALL)):
        with pytest.raises(ArtifactError):
            decode_bytes(SMALL[:length])


def _decode_or_artifact_error(data: bytes) -> None:
    try:
        tensors, meta = decode_bytes(data)
    except ArtifactError:
        return
    assert isinstance(meta, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())


WEIRD = [None, True, -1, 0, 1, 2**40, 10**30, 1.5, "", "sparse", "relative", [], [1, -2], {}, {"coding": "x"}]


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


def _replace(node, path, value):
    if not path:
        return value
    node = json.loads(json.dumps(node))
    target = node
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return node


@pytest.mark.timeout(60)
def test_fuzzed_headers_with_valid_checksums_raise_only_artifact_error():
    header, payload = _split(SMALL)
    start = time.perf_counter()
    for path in _paths(header):
        for value in WEIRD:
            _decode_or_artifact_error(_assemble(_replace(header, path, value), payload))
    assert time.perf_counter() - start < 20


@pytest.mark.timeout(60)
def test_fuzzed_bytes_raise_only_artifact_error():
    rng = random.Random(2024)
    start = time.perf_counter()
    for _ in range(300):  # random bytes, some behind a valid magic
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        _decode_or_artifact_error(junk)
        _decode_or_artifact_error(MAGIC + junk)
    header_len = PREAMBLE.unpack_from(SMALL)[3]
    for _ in range(1500):  # mutations resealed with a valid checksum, so parsing goes deep
        data = bytearray(SMALL)
        for _ in range(rng.randint(1, 4)):
            # half the time aim at the payload, where the entropy decoders read
            lo = PREAMBLE.size + (header_len if rng.random() < 0.5 else 0)
            data[rng.randrange(lo, len(data) - 4)] = rng.randrange(256)
        _decode_or_artifact_error(_reseal(bytes(data)))
    assert time.perf_counter() - start < 20
