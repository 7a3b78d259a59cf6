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
from deepshrink.formats.container import (MAX_HEADER_BYTES, RecordKind, TensorRecord, decode_bytes,
                                          encode_records, read_container, record_for, size_breakdown,
                                          write_container)

# the documented layout, restated so the tests double as its spec
PREAMBLE = struct.Struct("<8sHHIQ")
MAGIC = b"\x89DSK\r\n\x1a\n"
DEFLATED = 1  # flags bit 0: the header is one raw DEFLATE stream


def _deflate(data: bytes, level: int = 9) -> bytes:
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    return deflate.compress(data) + deflate.flush()


def _flags(data: bytes) -> int:
    return PREAMBLE.unpack_from(data)[2]


def _header_bytes(data: bytes) -> bytes:
    """The header's JSON, inflated if the file stores it compressed."""
    _, _, flags, header_len, _ = PREAMBLE.unpack_from(data)
    stored = data[PREAMBLE.size:PREAMBLE.size + header_len]
    return zlib.decompress(stored, -15) if flags & DEFLATED else stored


def _split(data: bytes) -> tuple[dict, bytes]:
    _, _, _, header_len, payload_len = PREAMBLE.unpack_from(data)
    header = json.loads(_header_bytes(data))
    return header, data[PREAMBLE.size + header_len:PREAMBLE.size + header_len + payload_len]


def _assemble(header, payload: bytes, *, version: int = 1, flags: int = 0) -> bytes:
    """A file with a valid checksum around ``header`` (bytes are stored as given, with ``flags``)."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = PREAMBLE.pack(MAGIC, version, flags, len(header_bytes), len(payload)) + header_bytes + payload
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


def _small_records() -> tuple[list[TensorRecord], dict]:
    """Every kind and every entropy mode (constant, fixed, Huffman, rANS), and metadata."""
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
    return records, {"arch": {"name": "tiny", "layers": [8, 16]}}


SMALL = encode_records(*_small_records())  # about 1.1 KiB, compressed header (flags 1)
SMALL_PLAIN = encode_records(*_small_records(), compress_header=False)  # the same, plain header (flags 0)
BOTH = pytest.mark.parametrize("small", [SMALL, SMALL_PLAIN], ids=["deflated-header", "plain-header"])


@BOTH
def test_small_file_exercises_every_entropy_mode(small):
    # the corruption and fuzz tests below only reach the decoders this file uses
    header, payload = _split(small)
    modes, offset = set(), 0
    for record in header["records"]:
        for role, length in record["streams"]:
            coded = role == "indices" or (role == "positions" and record["positions"]["coding"] == "relative")
            if coded:
                modes.add(payload[offset])
            offset += length
    assert modes == {0, 1, 2, 3} and len(small) < 1500


def test_header_is_deflated_when_that_makes_the_file_smaller():
    assert _flags(SMALL) == DEFLATED and _flags(SMALL_PLAIN) == 0
    plain_len, deflated_len = PREAMBLE.unpack_from(SMALL_PLAIN)[3], PREAMBLE.unpack_from(SMALL)[3]
    assert deflated_len < 0.6 * plain_len  # 7 records' JSON entries repeat the same keys
    assert len(SMALL_PLAIN) - len(SMALL) == plain_len - deflated_len  # only the header differs
    assert _header_bytes(SMALL) == _header_bytes(SMALL_PLAIN)
    assert _split(SMALL)[1] == _split(SMALL_PLAIN)[1]
    tensors, meta = decode_bytes(SMALL)
    plain_tensors, plain_meta = decode_bytes(SMALL_PLAIN)
    assert meta == plain_meta == _small_records()[1] and list(tensors) == list(plain_tensors)
    for name, t in tensors.items():
        _assert_same(t, plain_tensors[name])


@pytest.mark.parametrize("records, metadata", [([], None), ({}, {"k": "x"})])
def test_header_stays_plain_when_deflating_does_not_help(records, metadata):
    data = encode_records(records, metadata)
    assert _flags(data) == 0 and data == encode_records(records, metadata, compress_header=False)
    assert json.loads(_header_bytes(data)) == {"records": [], "metadata": metadata or {}}
    assert decode_bytes(data) == ({}, metadata or {})


def test_flags_0_files_are_the_format_as_it_was_and_still_decode():
    # the plain header is the compact JSON, byte for byte what flags-0 writers have always stored
    header, payload = _split(SMALL)
    compact = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("ascii")
    assert SMALL_PLAIN == _assemble(compact, payload)
    # a flags-0 file made by hand from the compressed one's parts decodes to the same tensors
    for data in (_assemble(compact, payload), _assemble(header, payload)):  # compact and spaced JSON
        tensors, meta = decode_bytes(data)
        expected, expected_meta = decode_bytes(SMALL)
        assert meta == expected_meta and list(tensors) == list(expected)
        for name, t in tensors.items():
            _assert_same(t, expected[name])
    # and a compressed header that was deflated by another writer (other level) reads the same
    relevelled = _assemble(_deflate(compact, level=1), payload, flags=DEFLATED)
    assert decode_bytes(relevelled)[1] == decode_bytes(SMALL)[1]


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


@BOTH
def test_size_breakdown_accounts_for_every_byte(small):
    rows = size_breakdown(small)
    assert [row["name"] for row in rows[:-1]] == list(decode_bytes(small)[0])
    assert rows[-1]["kind"] == "file"
    assert sum(row["total_bits"] for row in rows) == 8 * len(small)
    counts = ("values_bits", "positions_bits", "codebook_bits", "indices_bits", "header_bits", "total_bits")
    assert all(type(row[k]) is int for row in rows for k in counts)  # whole bits, not fractions
    for row in rows[:-1]:
        streams = row["values_bits"] + row["positions_bits"] + row["codebook_bits"] + row["indices_bits"]
        assert row["total_bits"] == streams + row["header_bits"]


def test_size_breakdown_shares_a_deflated_header_by_json_entry_length():
    plain, deflated = size_breakdown(SMALL_PLAIN), size_breakdown(SMALL)
    header_len = PREAMBLE.unpack_from(SMALL)[3]
    plain_len = len(_header_bytes(SMALL))
    entries = [row["header_bits"] for row in plain[:-1]]  # 8 x (JSON entry + its comma)
    assert [row["header_bits"] for row in deflated[:-1]] == [header_len * bits // plain_len for bits in entries]
    for p, d in zip(plain, deflated):  # the streams are the same bytes either way
        assert {k: v for k, v in p.items() if k not in ("header_bits", "total_bits")} == \
               {k: v for k, v in d.items() if k not in ("header_bits", "total_bits")}
    # the file row: preamble, checksum, metadata's and the framing's share, rounding leftovers
    records_share = sum(row["header_bits"] for row in deflated[:-1])
    assert deflated[-1]["total_bits"] == 8 * (PREAMBLE.size + 4 + header_len) - records_share
    outside_records = 8 * header_len * (8 * plain_len - sum(entries)) / (8 * plain_len)  # metadata, framing
    assert outside_records <= 8 * header_len - records_share < outside_records + len(entries)  # + rounding


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
    (SMALL[:8] + b"\x03" + SMALL[9:], "unsupported .dsk format version 3"),
    (_assemble(b"{}", b"", version=3, flags=DEFLATED), "version 3 .*reads versions 1 and 2 with flags 0 or 1"),
    (SMALL[:-10] + bytes([SMALL[-10] ^ 1]) + SMALL[-9:], "checksum mismatch"),
    (_assemble(b"{not json", b""), "not valid JSON"),
    (_assemble(b"[" * 100_000 + b"]" * 100_000, b""), "not valid JSON"),
    (_assemble({"records": {}}, b""), "'records' list"),
])
def test_decode_names_what_is_wrong(data, message):
    with pytest.raises(ArtifactError, match=message):
        decode_bytes(data)


@pytest.mark.parametrize("flags", [2, 3, 4, 0x8000, 0xFFFF])
def test_unknown_flag_bits_are_refused(flags):
    header, payload = _split(SMALL)
    stored = _deflate(json.dumps(header).encode()) if flags & DEFLATED else json.dumps(header).encode()
    with pytest.raises(ArtifactError, match=rf"\(flags {flags:#x}\); this deepshrink reads versions 1 "
                                            r"and 2 with flags 0 or 1"):
        decode_bytes(_assemble(stored, payload, flags=flags))


def _deflated_header_file(stored: bytes) -> bytes:
    return _assemble(stored, b"", flags=DEFLATED)


EMPTY = json.dumps({"records": [], "metadata": {}}).encode()


@pytest.mark.parametrize("stored, message", [
    (_deflate(EMPTY)[:-3], "compressed header is truncated"),
    (_deflate(EMPTY)[:1], "compressed header is truncated"),
    (b"", "compressed header is truncated"),
    (_deflate(EMPTY) + b"\x00\x00", "2 unexpected bytes after the compressed header"),
    (_deflate(EMPTY) + _deflate(EMPTY), "unexpected bytes after the compressed header"),
    (b"\xff" * 20, "not a valid DEFLATE stream"),
    (EMPTY, "not a valid DEFLATE stream"),  # plain JSON behind flag 1
    (_deflate(b"\xff\xfe{}"), "not valid JSON"),  # not UTF-8
    (_deflate(b""), "not valid JSON"),
])
def test_compressed_header_problems_are_named(stored, message):
    data = _deflated_header_file(stored)
    with pytest.raises(ArtifactError, match=message):
        decode_bytes(data)
    with pytest.raises(ArtifactError, match=message):
        size_breakdown(data)


@pytest.mark.timeout(60)
def test_deflate_bomb_header_stops_at_the_cap():
    # valid JSON that would decode fine if it were let through: only its inflated size is wrong
    prefix, suffix = b'{"records":[],"metadata":{"x":"', b'"}}'
    fill = b"a" * (MAX_HEADER_BYTES - len(prefix) - len(suffix))
    at_cap = _deflated_header_file(_deflate(prefix + fill + suffix))
    assert decode_bytes(at_cap)[1]["x"] == fill.decode()
    del at_cap
    bomb = _deflated_header_file(_deflate(prefix + fill + b"a" + suffix))
    del fill
    assert len(bomb) < MAX_HEADER_BYTES // 1000  # DEFLATE's ~1032:1 at most
    # a bigger bomb (256 MiB inflated) costs no more: inflating stops one byte past the cap
    deflate, chunk = zlib.compressobj(9, zlib.DEFLATED, -15), b"a" * 2**24
    huge = deflate.compress(prefix) + b"".join(deflate.compress(chunk) for _ in range(16)) + deflate.flush()
    start = time.perf_counter()
    for data in (bomb, _deflated_header_file(huge)):
        with pytest.raises(ArtifactError, match=rf"inflates to over {MAX_HEADER_BYTES} bytes"):
            decode_bytes(data)
    assert time.perf_counter() - start < 10


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


@BOTH
def test_flipping_any_byte_is_detected(small):
    for pos in range(len(small)):
        for flip in (0x01, 0x80, 0xFF):
            data = small[:pos] + bytes([small[pos] ^ flip]) + small[pos + 1:]
            with pytest.raises(ArtifactError):
                decode_bytes(data)


@BOTH
def test_truncation_at_every_length_is_detected(small):
    for length in range(len(small)):
        with pytest.raises(ArtifactError):
            decode_bytes(small[:length])


def test_every_cut_of_a_compressed_header_with_a_valid_checksum_is_refused():
    header_len = PREAMBLE.unpack_from(SMALL)[3]
    stored, payload = SMALL[PREAMBLE.size:PREAMBLE.size + header_len], _split(SMALL)[1]
    for length in range(header_len):
        with pytest.raises(ArtifactError, match="compressed header|not valid JSON"):
            decode_bytes(_assemble(stored[:length], payload, flags=DEFLATED))


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
@BOTH
def test_fuzzed_bytes_raise_only_artifact_error(small):
    rng = random.Random(2024)
    start = time.perf_counter()
    for _ in range(300):  # random bytes, some behind a valid magic
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        _decode_or_artifact_error(junk)
        _decode_or_artifact_error(MAGIC + junk)
    header_len = PREAMBLE.unpack_from(small)[3]
    for _ in range(1500):  # mutations resealed with a valid checksum, so parsing goes deep
        data = bytearray(small)
        for _ in range(rng.randint(1, 4)):
            # half the time aim at the payload, where the entropy decoders read
            lo = PREAMBLE.size + (header_len if rng.random() < 0.5 else 0)
            data[rng.randrange(lo, len(data) - 4)] = rng.randrange(256)
        _decode_or_artifact_error(_reseal(bytes(data)))
    assert time.perf_counter() - start < 20


def _version(data: bytes) -> int:
    return PREAMBLE.unpack_from(data)[1]


def test_a_float32_stream_whose_values_are_float16_is_stored_in_half_the_bytes_and_decodes_bit_for_bit():
    bias = torch.tensor([0.5, -0.0, 0.0, 1.0009765625, -65504.0, 6.103515625e-05, 3.0, -2.25])  # all float16 values
    data = encode_records([record_for("fc.bias", bias)])
    header, payload = _split(data)
    assert header["records"][0]["stored_as"] == {"values": "float16"}
    assert header["records"][0]["streams"] == [["values", 16]] and len(payload) == 16   # 2 B per value, not 4
    assert _version(data) == 2
    out = decode_bytes(data)[0]["fc.bias"]
    _assert_same(out, bias)
    assert torch.equal(out.view(torch.int32), bias.view(torch.int32))   # -0.0 stays -0.0
    # the same values nudged by one float32 ulp: not float16, stored as float32 in a version-1 file
    nudged = torch.nextafter(bias, torch.full_like(bias, 1e9))
    plain = encode_records([record_for("fc.bias", nudged)])
    assert "stored_as" not in _split(plain)[0]["records"][0] and len(_split(plain)[1]) == 32 and _version(plain) == 1
    _assert_same(decode_bytes(plain)[0]["fc.bias"], nudged)


def test_values_past_float16_range_that_are_bfloat16_go_to_bfloat16_and_float64_may_narrow_to_float32():
    big = torch.tensor([1e30, -3e-30, 2.0]).to(torch.bfloat16).float()
    header = _split(encode_records([record_for("scale", big)]))[0]["records"][0]
    assert header["stored_as"] == {"values": "bfloat16"}
    _assert_same(decode_bytes(encode_records([record_for("scale", big)]))[0]["scale"], big)
    wide = torch.tensor([0.1, 1e-40], dtype=torch.float32).double()
    data = encode_records([record_for("w64", wide)])
    assert _split(data)[0]["records"][0]["stored_as"] == {"values": "float32"}
    _assert_same(decode_bytes(data)[0]["w64"], wide)


def test_a_float16_codebook_is_narrowed_and_the_indices_are_unchanged():
    t, mask, cb, idx = _shared((16, 32), 0.9, 3, seed=4)
    cb16 = cb.half().float()
    t16 = torch.where(mask, cb16[idx], torch.zeros(()))
    wide, narrow = (record_for("w", x, mask=mask, codebook=c, indices=idx, kind="sparse_codebook")
                    for x, c in ((t, cb), (t16, cb16)))
    narrow_header, narrow_payload = _split(encode_records([narrow]))
    wide_header, wide_payload = _split(encode_records([wide]))
    assert narrow_header["records"][0]["stored_as"] == {"codebook": "float16"}
    streams = dict(narrow_header["records"][0]["streams"])
    assert streams["codebook"] == 2 * 8 and dict(wide_header["records"][0]["streams"])["codebook"] == 4 * 8
    assert streams["indices"] == dict(wide_header["records"][0]["streams"])["indices"]
    assert len(wide_payload) - len(narrow_payload) == 16
    _assert_same(decode_bytes(encode_records([narrow]))[0]["w"], t16)


@pytest.mark.parametrize("stored_as, why", [
    ({"values": "float64"}, "narrower than float32"),
    ({"values": "int8"}, "narrower than float32"),
    ({"indices": "float16"}, "values/codebook streams"),
    (["float16"], "must map"),
])
def test_a_stored_as_field_that_does_not_narrow_is_refused(stored_as, why):
    data = encode_records([record_for("fc.bias", torch.tensor([0.5, 2.0]))])
    header, payload = _split(data)
    header["records"][0]["stored_as"] = stored_as
    with pytest.raises(ArtifactError, match=rf"fc\.bias.*'stored_as' .* {why}"):
        decode_bytes(_assemble(header, payload, version=2))
