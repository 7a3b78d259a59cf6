""".dsk decoder fuzz, bounded in time: mutated valid files raise ``ArtifactError`` or decode — nothing else.

Mutations: bit flips, truncations, byte insertions and deletions of whole files, and the same on
the header or payload with lengths and checksum made right again (so the decoder's inner checks,
not the CRC, meet them), plus header JSON values replaced by hostile ones. Each case must finish
within ``CASE_LIMIT_S`` (a hang fails the test); the whole run stops after ``BUDGET_S``.
"""
from __future__ import annotations

import json
import random
import signal
import struct
import time
import zlib

import pytest
import torch

from deepshrink.core.errors import ArtifactError
from deepshrink.formats.container import decode_bytes, encode_records, record_for

BUDGET_S = 12.0
CASE_LIMIT_S = 2.0
PREAMBLE = struct.Struct("<8sHHIQ")
HOSTILE = [None, True, -1, 0, 1, 7, 255, 2**31, 2**40, 10**30, -(2**63), 1.5, float("inf"), "", "dense", "codebook",
           "relative", "bitmask", "float32", "bool", [], [0], [2**20, 2**20], [-1], {}, {"coding": "relative"}]


class CaseTooSlow(Exception):
    pass


def _valid_files() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 24, generator=g)
    pruned = torch.where(torch.rand(32, 24, generator=g) > 0.9, w, torch.zeros(()))
    half = torch.where(torch.rand(32, 24, generator=g) > 0.5, w, torch.zeros(()))
    codebook = torch.linspace(-1, 1, 16)
    indices = torch.randint(0, 16, (32, 24), generator=g)
    shared = torch.where(pruned != 0, codebook[indices], torch.zeros(()))
    records = [record_for("dense", w), record_for("relative", pruned, kind="sparse"),
               record_for("bitmask", half, kind="sparse"),
               record_for("codebook", codebook[indices], codebook=codebook, indices=indices, kind="codebook"),
               record_for("shared", shared, mask=pruned != 0, codebook=codebook, indices=indices, kind="sparse_codebook"),
               record_for("int8", torch.randint(-128, 127, (50,), generator=g, dtype=torch.int8)),
               record_for("flags", torch.rand(30, generator=g) > 0.5), record_for("bf16", w[:4].to(torch.bfloat16)),
               record_for("empty", torch.zeros(0, 5)), record_for("scalar", torch.tensor(3))]
    meta = {"arch": {"zoo": "seed-mlp", "kwargs": {"hidden": [8]}}, "note": "fuzz"}
    return [encode_records(records, meta), encode_records(records, meta, compress_header=False),
            encode_records(records[1:2], {}), encode_records(records[3:5], meta, compress_header=False)]


def _parts(data: bytes) -> tuple[int, bytes, bytes]:
    _, _, flags, header_len, payload_len = PREAMBLE.unpack_from(data)
    header = data[PREAMBLE.size:PREAMBLE.size + header_len]
    return flags, header, data[PREAMBLE.size + header_len:PREAMBLE.size + header_len + payload_len]


def _assemble(flags: int, header: bytes, payload: bytes) -> bytes:
    body = PREAMBLE.pack(b"\x89DSK\r\n\x1a\n", 1, flags, len(header), len(payload)) + header + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _flip(rng, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _insert(rng, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[at:]


def _delete(rng, data: bytes) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 16):]


def _json_leaf(rng, header: bytes) -> bytes:
    node = json.loads(header)
    paths, stack = [], [((), node)]
    while stack:
        path, value = stack.pop()
        paths.append(path)
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((path + (k,), v) for k, v in children)
    path = rng.choice(paths[1:])
    target = node
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = rng.choice(HOSTILE)
    return json.dumps(node).encode()


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "truncate", "insert", "delete", "flip-resealed", "insert-resealed",
                       "delete-resealed", "json-leaf"])
    if kind == "flip":
        return kind, _flip(rng, data)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "insert":
        return kind, _insert(rng, data)
    if kind == "delete":
        return kind, _delete(rng, data)
    flags, header, payload = _parts(data)
    if kind == "json-leaf":
        plain = zlib.decompress(header, -15) if flags & 1 else header
        return kind, _assemble(0, _json_leaf(rng, plain), payload)
    edit = {"flip-resealed": _flip, "insert-resealed": _insert, "delete-resealed": _delete}[kind]
    if rng.random() < 0.5:
        header = edit(rng, header)
    else:
        payload = edit(rng, payload)
    return kind, _assemble(flags, header, payload)


def _too_slow(signum, frame):
    raise CaseTooSlow


@pytest.mark.timeout(60)
def test_mutated_dsk_files_raise_only_artifact_error_and_never_hang():
    valid = _valid_files()
    for data in valid:   # the seeds decode, so every mutation starts from a good file
        decode_bytes(data)
    rng = random.Random(15)
    counts: dict[str, int] = {}
    previous = signal.signal(signal.SIGALRM, _too_slow)
    started = time.monotonic()
    try:
        while time.monotonic() - started < BUDGET_S:
            kind, data = mutate(rng, rng.choice(valid))
            signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
            try:
                tensors, meta = decode_bytes(data)
                outcome = "decoded"
                assert isinstance(meta, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())
            except ArtifactError as err:
                outcome = "refused"
                assert "\n" not in str(err)
            except CaseTooSlow:
                pytest.fail(f"a {kind} mutation took over {CASE_LIMIT_S} s to decode: {data[:64]!r}...")
            except Exception as err:   # anything but ArtifactError is a decoder bug
                pytest.fail(f"a {kind} mutation raised {type(err).__name__}: {err} (first bytes {data[:64]!r})")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[f"{kind} {outcome}"] = counts.get(f"{kind} {outcome}", 0) + 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    total = sum(counts.values())
    assert total >= 300, counts   # enough cases to mean something on a slow CI machine
    assert sum(n for k, n in counts.items() if k.endswith("refused")) > total / 2, counts
