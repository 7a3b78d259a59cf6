"""Checks of a ``.pte`` / ``.onnx`` file's bytes before a native runtime sees them.

They refuse what is plainly not a program — random bytes, a truncated copy, a wrong file renamed —
with a message that says so, in pure Python (no native parser touches the bytes). A file that
passes can still be corrupted inside; ``evaluation.isolation`` catches what then crashes.

``.pte`` layout (``executorch/exir/_serialize/_program.py``): a FlatBuffer whose bytes 0-4 are the
root table offset and 4-8 the identifier ``ET12``; at 8 an extended header ``eh00``, its length
(u32), the program size (u64, header included), the segment base offset (u64) and the segment
data size (u64), little-endian; the segments follow the program at the base offset.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from deepshrink.core.errors import ArtifactError

PTE_IDENTIFIER = b"ET12"
_EXTENDED_MAGIC = b"eh00"
_EXTENDED = struct.Struct("<4sIQQ")   # magic, length, program size, segment base offset
_SEGMENT_SIZE = struct.Struct("<Q")
_REEXPORT = "export the model again (deepshrink.export or a recipe's export stage)"


def read_artifact(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read it: {err.strerror or err}") from None


def check_pte(data: bytes, where: str | os.PathLike) -> None:
    """``ArtifactError`` unless ``data`` is laid out as an ExecuTorch program: identifier, extended
    header, sizes and segment offsets inside the file, names the runtime logs valid UTF-8."""
    def refuse(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: ExecuTorch could not load this program: {why}; {_REEXPORT}")

    if len(data) < 8 + _EXTENDED.size:
        raise refuse(f"the file has {len(data)} bytes, fewer than a program's headers")
    if data[4:8] != PTE_IDENTIFIER:
        if data[4:6] == b"ET":
            raise refuse(f"it is program format {data[4:8]!r}, this ExecuTorch reads {PTE_IDENTIFIER!r}")
        raise refuse(f"it is not an ExecuTorch program (bytes 4-8 are {data[4:8]!r}, a program has {PTE_IDENTIFIER!r} there)")
    root = struct.unpack_from("<I", data, 0)[0]
    magic, length, program_size, segment_base = _EXTENDED.unpack_from(data, 8)
    if magic != _EXTENDED_MAGIC:
        raise refuse(f"bytes 8-12 are {magic!r}, where the extended header {_EXTENDED_MAGIC.decode()!r} starts")
    if not _EXTENDED.size <= length <= 64:
        raise refuse(f"its extended header claims {length} bytes (valid: {_EXTENDED.size}-64)")
    if 8 + length > len(data):
        raise refuse(f"the file is truncated: its extended header claims {length} bytes, the file has {len(data)}")
    segment_size = _SEGMENT_SIZE.unpack_from(data, 8 + _EXTENDED.size)[0] if length >= _EXTENDED.size + 8 else 0
    if program_size > len(data):
        raise refuse(f"the file is truncated: its header says the program is {program_size} bytes, the file has {len(data)}")
    if not 8 + length <= root < program_size:
        raise refuse(f"its root table offset {root} lies outside the {program_size}-byte program")
    if segment_base:
        if segment_base < program_size or segment_base > len(data):
            raise refuse(f"its segments start at byte {segment_base}, outside bytes {program_size}-{len(data)}")
        if segment_base + segment_size > len(data):
            raise refuse(f"the file is truncated: its segments end at byte {segment_base + segment_size}, "
                         f"the file has {len(data)}")
    elif segment_size:
        raise refuse(f"it claims {segment_size} bytes of segments but no segment offset")
    _check_flatbuffer(data[:program_size], len(data) - segment_base if segment_base else 0, refuse)


def _check_flatbuffer(program: bytes, segment_bytes: int, refuse) -> None:
    """Walk the tables the runtime reads first: names it may log (its logger aborts the process on a
    name that is not UTF-8) and every segment's byte range. Every read is bounds-checked."""
    fb = _FlatBuffer(program)
    try:
        root = fb.root()
        for plan in fb.tables(root, _PROGRAM_EXECUTION_PLAN):
            names = [fb.string(plan, _PLAN_NAME)]
            for op in fb.tables(plan, _PLAN_OPERATORS):
                names += [fb.string(op, _OPERATOR_NAME), fb.string(op, _OPERATOR_OVERLOAD)]
            names += [fb.string(d, _DELEGATE_ID) for d in fb.tables(plan, _PLAN_DELEGATES)]
            for name in names:
                if name is not None:
                    name.decode("utf-8")
        for i, segment in enumerate(fb.tables(root, _PROGRAM_SEGMENTS)):
            offset, size = fb.u64(segment, _SEGMENT_OFFSET), fb.u64(segment, _SEGMENT_SIZE_FIELD)
            if offset + size > segment_bytes:
                raise refuse(f"segment {i} (bytes {offset}-{offset + size}) lies past the {segment_bytes} bytes "
                             "of segment data")
    except UnicodeDecodeError:
        raise refuse("a method, operator or backend name in it is not text (the file is corrupted)") from None
    except _Malformed as err:
        raise refuse(f"its FlatBuffer tables are malformed ({err})") from None


# field numbers (program.fbs, in declaration order) of what _check_flatbuffer reads
_PROGRAM_EXECUTION_PLAN, _PROGRAM_SEGMENTS = 1, 4
_PLAN_NAME, _PLAN_OPERATORS, _PLAN_DELEGATES = 0, 6, 7
_OPERATOR_NAME, _OPERATOR_OVERLOAD = 0, 1
_DELEGATE_ID = 0
_SEGMENT_OFFSET, _SEGMENT_SIZE_FIELD = 0, 1
_MAX_VECTOR = 1 << 20   # more operators, plans or segments than any program has: the length is garbage


class _Malformed(Exception):
    pass


class _FlatBuffer:
    """Just enough of the FlatBuffers wire format to read tables, strings, vectors and u64 fields."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise _Malformed(f"a read at byte {pos} past the {len(self.data)}-byte program")
        return struct.unpack_from(fmt, self.data, pos)[0]

    def root(self) -> int:
        return self._table(0)

    def _table(self, at: int) -> int:
        """The table a uoffset at ``at`` points to (its vtable checked)."""
        table = at + self._unpack("<I", at)
        vtable = table - self._unpack("<i", table)
        vsize = self._unpack("<H", vtable)
        if vsize < 4 or vsize % 2 or vtable + vsize > len(self.data):
            raise _Malformed(f"a vtable of {vsize} bytes at byte {vtable}")
        return table

    def _field(self, table: int, index: int) -> int | None:
        vtable = table - self._unpack("<i", table)
        slot = 4 + 2 * index
        if slot >= self._unpack("<H", vtable):
            return None
        offset = self._unpack("<H", vtable + slot)
        return table + offset if offset else None

    def string(self, table: int, index: int) -> bytes | None:
        at = self._field(table, index)
        if at is None:
            return None
        start = at + self._unpack("<I", at)
        length = self._unpack("<I", start)
        if start + 4 + length > len(self.data):
            raise _Malformed(f"a {length}-byte string at byte {start} past the program's end")
        return self.data[start + 4:start + 4 + length]

    def tables(self, table: int, index: int) -> list[int]:
        at = self._field(table, index)
        if at is None:
            return []
        start = at + self._unpack("<I", at)
        length = self._unpack("<I", start)
        if length > _MAX_VECTOR or start + 4 + 4 * length > len(self.data):
            raise _Malformed(f"a vector of {length} entries at byte {start}")
        return [self._table(start + 4 + 4 * i) for i in range(length)]

    def u64(self, table: int, index: int) -> int:
        at = self._field(table, index)
        return 0 if at is None else self._unpack("<Q", at)


def check_onnx(data: bytes, where: str | os.PathLike):
    """The parsed ``onnx.ModelProto``; ``ArtifactError`` unless ``data`` is a well-formed ONNX model
    (protobuf parse, then ``onnx.checker``)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError) as err:
        raise ArtifactError(f"{where}: ONNX Runtime could not load this model: it is not an ONNX model (it does not "
                            f"parse as one: {str(err)[:200] or type(err).__name__}); {_REEXPORT}") from None
    if not model.graph.output:
        raise ArtifactError(f"{where}: ONNX Runtime could not load this model: its graph has no outputs; {_REEXPORT}")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as err:
        first = " ".join(str(err).split())[:300]
        raise ArtifactError(f"{where}: ONNX Runtime could not load this model: the ONNX checker refuses it ({first}); "
                            f"{_REEXPORT}") from None
    return model


def uses_external_data(model) -> bool:
    """Whether some initializer's bytes live in a file beside the model (the session must load the path)."""
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
