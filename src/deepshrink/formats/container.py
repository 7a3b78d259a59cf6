"""The ``.dsk`` container: named compressed tensors plus free-form JSON metadata in one file.

Layout, integers little-endian:

    offset   size  field
    0        8     magic b"\\x89DSK\\r\\n\\x1a\\n" (PNG-style: catches text-mode and 7-bit mangling)
    8        2     format version: 2 when a record stores a stream in a narrower float type
                   (its header's ``stored_as``, see ``formats.records``), else 1
    10       2     flags: bit 0 = the header is compressed; any other bit set is refused
    12       4     header length H (as stored: compressed length when bit 0 is set)
    16       8     payload length P
    24       H     header, UTF-8 JSON: {"records": [...], "metadata": {...}};
                   with flag bit 0, that JSON compressed as one raw DEFLATE stream (RFC 1951)
    24+H     P     payload: every record's streams back to back, in header order
    24+H+P   4     CRC32 of all preceding bytes

The encoder compresses the header (zlib level 9) and sets flag bit 0 only when that makes it
smaller; otherwise it writes flags 0 and the plain JSON, so files from before the flag existed
and files written now under flags 0 are the same format. Likewise the version is 2 only when a
record narrows a stream (a reader from before then refuses such a file by its version instead of
misreading it) and 1 otherwise, byte for byte the files from before. Each header record
(``formats.records``) lists its streams as [role, byte length] pairs; their offsets follow from
the order and their lengths must add up to P. Decoding runs no code from the file (JSON and raw
numpy buffers only), checks the length fields against the file size and the checksum before
inflating or parsing, inflates a compressed header to at most ``MAX_HEADER_BYTES`` (a complete
stream with nothing after it, or the file is refused), and refuses more than ``max_elements``
decoded elements in total, and tensors larger in all than the file can honestly hold: entropy-coded
positions and indices may describe any number of elements in a few bytes (a constant stream is 3
bytes), so the decoded bytes are capped at ``MAX_EXPANSION`` times the file size, or
``MIN_DECODED_CAP`` for small files — checked from the header, before anything is allocated.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.core.io import atomic_write_bytes
from deepshrink.formats import records as rec
from deepshrink.formats import sparse
from deepshrink.formats.records import RecordKind, TensorRecord, record_for
from deepshrink.ops import entropy

__all__ = ["MAGIC", "VERSION", "FLAG_DEFLATE_HEADER", "MAX_HEADER_BYTES", "DEFAULT_MAX_ELEMENTS", "MAX_EXPANSION",
           "MIN_DECODED_CAP", "decoded_cap",
           "RecordKind", "TensorRecord", "record_for", "encode_records", "decode_bytes", "write_container",
           "read_container", "size_breakdown"]

MAGIC = b"\x89DSK\r\n\x1a\n"
VERSION = 2          # the newest version written and read
_READS = (1, 2)
FLAG_DEFLATE_HEADER = 1  # flags bit 0: the header is raw-DEFLATE-compressed JSON
_KNOWN_FLAGS = FLAG_DEFLATE_HEADER
MAX_HEADER_BYTES = 64 * 2**20  # a compressed header inflates to at most this (a deflate bomb stops here)
DEFAULT_MAX_ELEMENTS = 2**28  # 1 GiB of float32: far above any mobile model
# decoded tensor bytes per file byte. Real files decode to 1-200x their size (dense: 1x; the
# bench's Deep Compression files 58-80x, its variational-dropout LeNet-5 180x); a crafted
# 262-byte file claiming 1 GiB would be 4,000,000x
MAX_EXPANSION = 512
MIN_DECODED_CAP = 64 * 2**20  # what any file may decode to (a small, heavily pruned model)
_PREAMBLE = struct.Struct("<8sHHIQ")
_CRC = struct.Struct("<I")
_JSON = dict(separators=(",", ":"), allow_nan=False)

Records = Iterable[rec.TensorRecord] | Mapping[str, torch.Tensor]


def encode_records(records: Records, metadata: Mapping[str, Any] | None = None, *,
                   compress_header: bool = True) -> bytes:
    """The ``.dsk`` bytes for ``records`` (a state dict is turned into records with ``record_for``).

    The header is stored compressed (flag bit 0) when that is smaller; ``compress_header=False``
    always writes the plain header with flags 0, byte for byte as before the flag existed.
    """
    if isinstance(records, Mapping):
        records = [rec.record_for(name, t) for name, t in records.items()]
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
    headers, chunks, seen = [], [], set()
    for r in records:
        if not isinstance(r, rec.TensorRecord):
            raise ConfigError(f"records: need TensorRecords (see record_for) or a state dict, got {type(r).__name__}")
        if r.name in seen:
            raise ConfigError(f"records: the name {r.name!r} appears twice; names must be unique")
        seen.add(r.name)
        fields, streams = rec.encode_record(r)
        fields["streams"] = [[role, len(b)] for role, b in streams]
        headers.append(fields)
        chunks.extend(b for _, b in streams)
    try:
        header = json.dumps({"records": headers, "metadata": dict(metadata)}, **_JSON).encode("ascii")
    except (TypeError, ValueError) as err:
        raise ConfigError(f"metadata is not plain JSON (dicts, lists, str, finite numbers): {err}") from None
    flags = 0
    if compress_header and len(header) <= MAX_HEADER_BYTES:  # larger would not be read back
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        packed = deflate.compress(header) + deflate.flush()
        if len(packed) < len(header):
            header, flags = packed, FLAG_DEFLATE_HEADER
    payload = b"".join(chunks)
    version = VERSION if any(rec.has_narrowed_streams(h) for h in headers) else 1
    body = _PREAMBLE.pack(MAGIC, version, flags, len(header), len(payload)) + header + payload
    return body + _CRC.pack(zlib.crc32(body))


def decode_bytes(data: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS,
                 max_decoded_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors by name in file order, metadata) from ``.dsk`` bytes; ``ArtifactError`` if invalid.

    ``max_decoded_bytes``: the most the tensors may take decoded (default: ``decoded_cap(len(data))``)."""
    records, _, _, metadata = _decode_records(data, max_elements, max_decoded_bytes)
    return {r.name: r.to_tensor() for r in records}, metadata


def write_container(path: str | os.PathLike, records: Records,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a ``.dsk`` file atomically (a crash never leaves half a file); returns its path."""
    return atomic_write_bytes(path, encode_records(records, metadata))


def read_container(path: str | os.PathLike, *, max_elements: int = DEFAULT_MAX_ELEMENTS,
                   max_decoded_bytes: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a ``.dsk`` file; ``ArtifactError`` (naming the file) if unreadable or invalid."""
    data = _read(path)
    try:
        return decode_bytes(data, max_elements=max_elements, max_decoded_bytes=max_decoded_bytes)
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None


def decoded_cap(file_bytes: int) -> int:
    """The most a ``.dsk`` file of ``file_bytes`` may decode to unless the caller says otherwise."""
    return max(MIN_DECODED_CAP, MAX_EXPANSION * file_bytes)


def size_breakdown(path_or_bytes: str | os.PathLike | bytes, *,
                   max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[dict[str, Any]]:
    """Where the bytes go: one dict per record, then one ``kind="file"`` row for the rest.

    Bits per record: ``values_bits``, ``positions_bits``, ``codebook_bits``, ``indices_bits``,
    ``header_bits`` and ``total_bits``; ``coded_bits`` is the part that is entropy-coded
    (relative-index positions, codebook indices) and ``entropy_bound_bits`` the Shannon bound of
    those symbols. ``header_bits`` is 8 x the length of the record's JSON entry (with its comma)
    in a plain header; in a compressed header it is the record's share of the compressed bytes,
    in proportion to that JSON entry's length within the whole plain JSON header, rounded down to
    whole bits. The ``kind="file"`` row has the rest: preamble, checksum, metadata and the JSON
    around the records (or their share of the compressed header) and any rounding leftovers. All
    values are integers except ``entropy_bound_bits``; the ``total_bits`` of all rows add up to
    exactly 8 x file size.
    """
    data = bytes(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray, memoryview)) else _read(path_or_bytes)
    headers, metadata, payload, plain_len = _parse(data)
    records, stream_sets, header_list, _ = _decode_parsed(headers, metadata, payload, max_elements,
                                                          decoded_cap(len(data)))
    entry_lens = [len(json.dumps(fields, **_JSON)) + 1 for fields in header_list]  # + its separating comma
    _, _, flags, stored_len, _ = _PREAMBLE.unpack_from(data)
    if flags & FLAG_DEFLATE_HEADER:
        # never more than the whole compressed header, even if a hand-made header was laid out differently
        plain_len = max(plain_len, sum(entry_lens), 1)
        header_shares = [8 * stored_len * n // plain_len for n in entry_lens]
    else:
        header_shares = [8 * n for n in entry_lens]
    rows = []
    for r, fields, streams, header_bits in zip(records, header_list, stream_sets, header_shares):
        bits = {f"{role}_bits": 8 * len(streams.get(role, b"")) for role in ("values", "positions", "codebook", "indices")}
        coded_bits, bound = 0, 0.0
        info = fields.get("positions", {})
        if info.get("coding") == sparse.PositionCoding.RELATIVE.value:
            coded_bits += bits["positions_bits"]
            bound += entropy.entropy_bits(entropy.decode(streams["positions"], info["count"]))
        if r.indices is not None:
            coded_bits += bits["indices_bits"]
            bound += entropy.entropy_bits(r.indices.numpy())
        rows.append({"name": r.name, "kind": r.kind.value, "dtype": r.dtype, "shape": list(r.shape),
                     "numel": r.numel, "nnz": r.nnz, "position_coding": info.get("coding"),
                     "index_bits": info.get("index_bits"), "codebook_size": fields.get("codebook_size"),
                     **bits, "header_bits": header_bits, "total_bits": sum(bits.values()) + header_bits,
                     "coded_bits": coded_bits, "entropy_bound_bits": bound})
    rest = 8 * len(data) - sum(row["total_bits"] for row in rows)
    rows.append({"name": "", "kind": "file", "dtype": None, "shape": [], "numel": 0, "nnz": 0,
                 "position_coding": None, "index_bits": None, "codebook_size": None,
                 "values_bits": 0, "positions_bits": 0, "codebook_bits": 0, "indices_bits": 0,
                 "header_bits": rest, "total_bits": rest, "coded_bits": 0, "entropy_bound_bits": 0.0})
    return rows


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read .dsk file {str(path)!r}: {err.strerror or err}") from None


def _parse(data: bytes) -> tuple[list, dict, bytes, int]:
    """(record headers, metadata, payload, plain header length) after checking magic, version,
    flags, lengths and checksum, and inflating the header if it is compressed."""
    data = bytes(data)
    if data[:len(MAGIC)] != MAGIC[:len(data)] or not data:
        raise ArtifactError(f"not a .dsk file: it starts with {data[:8]!r}, expected magic {MAGIC!r}")
    if len(data) < _PREAMBLE.size:
        raise ArtifactError(f"truncated at byte {len(data)}: the .dsk preamble is {_PREAMBLE.size} bytes")
    _, version, flags, header_len, payload_len = _PREAMBLE.unpack_from(data)
    if version not in _READS or flags & ~_KNOWN_FLAGS:
        raise ArtifactError(f"unsupported .dsk format version {version} (flags {flags:#x}); this deepshrink "
                            f"reads versions 1 and 2 with flags 0 or 1: upgrade deepshrink or re-export the model")
    expected = _PREAMBLE.size + header_len + payload_len + _CRC.size
    if len(data) < expected:
        raise ArtifactError(f"truncated at byte {len(data)}: the header says the file is {expected} bytes "
                            f"({header_len}-byte header, {payload_len}-byte payload)")
    if len(data) > expected:
        raise ArtifactError(f"{len(data) - expected} unexpected bytes after the checksum: the header says "
                            f"the file is {expected} bytes")
    stored = _CRC.unpack_from(data, expected - _CRC.size)[0]
    computed = zlib.crc32(memoryview(data)[:expected - _CRC.size])
    if stored != computed:
        raise ArtifactError(f"checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): "
                            f"the file is corrupted")
    header_end = _PREAMBLE.size + header_len
    text = data[_PREAMBLE.size:header_end]
    if flags & FLAG_DEFLATE_HEADER:
        text = _inflate_header(text)
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise ArtifactError(f"header is not valid JSON: {str(err):.200}") from None
    if (not isinstance(header, dict) or not isinstance(header.get("records"), list)
            or not isinstance(header.get("metadata"), dict)):
        raise ArtifactError("header must be a JSON object with a 'records' list and a 'metadata' object")
    return header["records"], header["metadata"], data[header_end:header_end + payload_len], len(text)


def _inflate_header(packed: bytes) -> bytes:
    """The plain JSON of a compressed header: one complete raw DEFLATE stream of at most
    ``MAX_HEADER_BYTES`` inflated bytes with nothing after it, else ``ArtifactError``."""
    inflater = zlib.decompressobj(-15)
    try:
        # one byte over the cap tells "too big" from "exactly the cap"; output stops there
        text = inflater.decompress(packed, MAX_HEADER_BYTES + 1)
    except zlib.error as err:
        raise ArtifactError(f"compressed header is not a valid DEFLATE stream: {err}") from None
    if len(text) > MAX_HEADER_BYTES:
        raise ArtifactError(f"compressed header inflates to over {MAX_HEADER_BYTES} bytes, the most a "
                            f"compressed .dsk header may hold: the file is corrupted or hostile")
    if not inflater.eof:  # under the cap all input was read, so the stream is cut short
        raise ArtifactError(f"compressed header is truncated: its {len(packed)} bytes end before the "
                            f"DEFLATE stream does")
    if inflater.unused_data:
        raise ArtifactError(f"{len(inflater.unused_data)} unexpected bytes after the compressed header's "
                            f"DEFLATE stream")
    return text


def _decode_records(data: bytes, max_elements: int, max_bytes: int | None = None
                    ) -> tuple[list[rec.TensorRecord], list[dict[str, bytes]], list, dict]:
    """(records, their streams by role, their header entries, metadata)."""
    return _decode_parsed(*_parse(data)[:3], max_elements, decoded_cap(len(data)) if max_bytes is None else max_bytes)


def _decode_parsed(headers: list, metadata: dict, payload: bytes, max_elements: int,
                   max_bytes: int) -> tuple[list[rec.TensorRecord], list[dict[str, bytes]], list, dict]:
    claimed = 0
    for i, fields in enumerate(headers):   # every size claim checked before anything is decoded
        claimed += rec.decoded_bytes(fields, where=_where(i, fields), max_elements=max_elements)
    if claimed > max_bytes:
        raise ArtifactError(f"the records claim {claimed} bytes of decoded tensors, more than this file can honestly "
                            f"hold (at most {max_bytes}: {MAX_EXPANSION}x its size, or {MIN_DECODED_CAP >> 20} MiB): "
                            "the file is corrupted or crafted (pass max_decoded_bytes if it is trusted)")
    records, stream_sets, names = [], [], set()
    offset, budget = 0, max_elements
    for i, fields in enumerate(headers):
        where = _where(i, fields)
        streams = _streams(fields, payload, offset, where)
        offset += sum(len(b) for b in streams.values())
        r = rec.decode_record(fields, streams, where=where, max_elements=budget)
        if r.name in names:
            raise ArtifactError(f"{where}: the name appears twice")
        names.add(r.name)
        budget -= r.numel
        records.append(r)
        stream_sets.append(streams)
    if offset != len(payload):
        raise ArtifactError(f"the records' streams cover {offset} bytes, the payload has {len(payload)}")
    return records, stream_sets, headers, metadata


def _where(i: int, fields: Any) -> str:
    return f"record {i}" + (f" ({fields['name']!r:.80})" if isinstance(fields, dict)
                            and isinstance(fields.get("name"), str) else "")


def _streams(fields: Any, payload: bytes, offset: int, where: str) -> dict[str, bytes]:
    listed = fields.get("streams") if isinstance(fields, dict) else None
    if (not isinstance(listed, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], str)
            and isinstance(s[1], int) and not isinstance(s[1], bool) and s[1] >= 0 for s in listed)):
        raise ArtifactError(f"{where}: 'streams' must be a list of [role, byte length] pairs")
    out = {}
    for role, length in listed:
        if role in out:
            raise ArtifactError(f"{where}: stream {role!r} is listed twice")
        if offset + length > len(payload):
            raise ArtifactError(f"{where}: header says stream {role!r} is {length} bytes at payload offset "
                                f"{offset}, but the payload has {len(payload)} bytes")
        out[role] = payload[offset:offset + length]
        offset += length
    return out
