"""Tensor records: one named tensor in one of four storage kinds, and its byte streams.

    dense            every value, raw little-endian           (biases, unpruned layers)
    sparse           positions + the stored values, raw        (pruned, not shared)
    codebook         codebook + one index per element          (shared weights, dense)
    sparse_codebook  positions + codebook + one index per      (Deep Compression: pruned and
                     stored entry                               shared)

Positions and indices are entropy-coded (``formats.sparse``, ``ops.entropy``); values and
codebooks are raw in the tensor's dtype, or in a narrower float type (float16, then bfloat16)
when every value of the stream converts to it and back bit for bit (the header's ``stored_as``
names it; e.g. biases a scheme rounded to float16), so every kind decodes to exactly the tensor
it was built from. ``record_for`` builds each kind the inputs allow and keeps the smallest.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Mapping

import numpy as np
import torch

from deepshrink.core.errors import ArtifactError, ConfigError
from deepshrink.formats import sparse
from deepshrink.ops import entropy


class RecordKind(str, enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    CODEBOOK = "codebook"
    SPARSE_CODEBOOK = "sparse_codebook"


# dtype name -> (torch dtype, little-endian numpy storage type of the same width)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"), "float64": (torch.float64, "<f8"),
    "int8": (torch.int8, "<i1"), "uint8": (torch.uint8, "<u1"), "int16": (torch.int16, "<i2"),
    "int32": (torch.int32, "<i4"), "int64": (torch.int64, "<i8"), "bool": (torch.bool, "<u1"),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
MAX_CODEBOOK = entropy.MAX_ALPHABET
# a float stream is stored in the first of these narrower types that holds all its values exactly
NARROWER = {"float32": ("float16", "bfloat16"), "float64": ("float32", "float16", "bfloat16")}
_BITS_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}
_MAX_DIM = 2**31 - 1

# the byte streams of each kind, in file order
STREAMS: dict[RecordKind, tuple[str, ...]] = {
    RecordKind.DENSE: ("values",),
    RecordKind.SPARSE: ("positions", "values"),
    RecordKind.CODEBOOK: ("codebook", "indices"),
    RecordKind.SPARSE_CODEBOOK: ("positions", "codebook", "indices"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class TensorRecord:
    """One named tensor as stored. Build it with ``record_for``; ``to_tensor`` rebuilds it.

    values:     DENSE: all ``numel`` values; SPARSE: the values at ``positions``.
    positions:  SPARSE kinds: strictly increasing flat int64 indices of the stored entries.
    codebook:   CODEBOOK kinds: 1-D, in ``dtype``, 1..65536 entries.
    indices:    CODEBOOK: one index per element; SPARSE_CODEBOOK: one per position.
    index_bits: relative-index gap width for the positions; None picks it per tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: RecordKind
    values: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    index_bits: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "kind", _parse_kind(self.kind, self.name))
        _validate(self)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nnz(self) -> int:
        """Stored entries: ``numel`` for the dense kinds."""
        return self.numel if self.positions is None else int(self.positions.numel())

    def to_tensor(self) -> torch.Tensor:
        torch_dtype = DTYPES[self.dtype][0]
        if self.kind == RecordKind.DENSE:
            return self.values.reshape(self.shape)
        if self.kind == RecordKind.CODEBOOK:
            return self.codebook[self.indices].reshape(self.shape)
        stored = self.values if self.kind == RecordKind.SPARSE else self.codebook[self.indices]
        out = torch.zeros(self.numel, dtype=torch_dtype)
        out[self.positions] = stored
        return out.reshape(self.shape)


def record_for(name: str, tensor: torch.Tensor, *, mask: torch.Tensor | None = None,
               codebook: torch.Tensor | None = None, indices: torch.Tensor | None = None,
               index_bits: int | None = None, kind: RecordKind | str | None = None) -> TensorRecord:
    """The cheapest record that decodes to exactly ``tensor`` (pruned zeros come back as +0.0).

    mask:     True (or 1) where a weight is kept (default: ``tensor != 0``); entries outside it
              must be 0.
    codebook, indices: shared weights, ``tensor`` equal to ``codebook[indices]`` where kept;
              ``indices`` has the tensor's shape. Enables the two codebook kinds.
    index_bits: fixes the relative-index gap width (a bitmask is still used if smaller).
    kind:     force one storage kind instead of the smallest.
    """
    t = _as_tensor(tensor, name)
    dtype = _DTYPE_NAMES[t.dtype]
    flat = t.reshape(-1)
    keep = _keep_mask(name, flat, t.shape, mask)
    positions = torch.nonzero(keep).reshape(-1)
    common = dict(name=name, shape=tuple(t.shape), dtype=dtype, index_bits=index_bits)
    candidates = {
        RecordKind.DENSE: TensorRecord(kind=RecordKind.DENSE, values=flat, **{**common, "index_bits": None}),
        RecordKind.SPARSE: TensorRecord(kind=RecordKind.SPARSE, positions=positions,
                                        values=flat[positions], **common),
    }
    if codebook is not None or indices is not None:
        candidates.update(_codebook_candidates(name, flat, t.shape, dtype, keep, positions,
                                               codebook, indices, common))
    if kind is not None:
        wanted = _parse_kind(kind, name)
        if wanted not in candidates:
            raise ConfigError(f"{name}: kind {wanted.value!r} needs a codebook and indices")
        return candidates[wanted]
    return min(candidates.values(), key=encoded_size)


def encode_record(record: TensorRecord) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """(header fields, [(stream role, bytes)]) for one record; roles in ``STREAMS`` order."""
    fields: dict[str, Any] = {"name": record.name, "shape": list(record.shape),
                              "dtype": record.dtype, "kind": record.kind.value}
    streams: dict[str, bytes] = {}
    if record.positions is not None:
        encoded = sparse.encode_positions(record.positions.numpy(), record.numel, index_bits=record.index_bits)
        fields["nnz"] = record.nnz
        fields["positions"] = {"coding": encoded.coding.value, "index_bits": encoded.index_bits,
                               "count": encoded.count}
        streams["positions"] = encoded.payload
    stored_as: dict[str, str] = {}
    for role, tensor in (("values", record.values), ("codebook", record.codebook)):
        if tensor is not None:
            dtype = _narrowest(tensor, record.dtype)
            if dtype != record.dtype:
                stored_as[role] = dtype
            streams[role] = _tensor_bytes(tensor.to(DTYPES[dtype][0]), dtype)
    if record.codebook is not None:
        fields["codebook_size"] = int(record.codebook.numel())
        streams["indices"] = entropy.encode(record.indices.numpy())
    if stored_as:
        fields["stored_as"] = stored_as
    return fields, [(role, streams[role]) for role in STREAMS[record.kind]]


def encoded_size(record: TensorRecord) -> int:
    """Bytes the record takes in a container: its streams plus its header entry."""
    fields, streams = encode_record(record)
    return len(json.dumps(fields, separators=(",", ":"))) + sum(len(b) for _, b in streams)


def decode_record(fields: Any, streams: Mapping[str, bytes], *, where: str,
                  max_elements: int) -> TensorRecord:
    """Inverse of ``encode_record`` for untrusted input; ``ArtifactError`` messages start with
    ``where``. Refuses tensors of more than ``max_elements`` elements before allocating them."""
    try:
        kind, numel = _check_fields(fields, max_elements)
        if set(streams) != set(STREAMS[kind]):
            raise ArtifactError(f"{kind.value} record has streams {sorted(streams)}, "
                                f"expected {list(STREAMS[kind])}")
        dtype = fields["dtype"]
        values = positions = codebook = indices = None
        count = numel
        if "positions" in streams:
            info = fields["positions"]
            encoded = sparse.EncodedPositions(sparse.PositionCoding(info["coding"]), streams["positions"],
                                              info["index_bits"], info["count"])
            positions = torch.from_numpy(sparse.decode_positions(encoded, numel=numel, nnz=fields["nnz"]))
            count = fields["nnz"]
        stored_as = fields.get("stored_as", {})
        torch_dtype = DTYPES[dtype][0]
        if "values" in streams:
            values = _tensor_from_bytes(streams["values"], stored_as.get("values", dtype), count,
                                        role="values").to(torch_dtype)
        if "codebook" in streams:
            size = fields["codebook_size"]
            codebook = _tensor_from_bytes(streams["codebook"], stored_as.get("codebook", dtype), size,
                                          role="codebook").to(torch_dtype)
            symbols = entropy.decode(streams["indices"], count)
            if symbols.size and int(symbols.max()) >= size:
                raise ArtifactError(f"index {int(symbols.max())} is past the {size}-entry codebook")
            indices = torch.from_numpy(symbols)
        return TensorRecord(fields["name"], tuple(fields["shape"]), dtype, kind, values=values,
                            positions=positions, codebook=codebook, indices=indices)
    except (ArtifactError, ConfigError) as err:
        raise ArtifactError(f"{where}: {err}") from None


def decoded_bytes(fields: Any, *, where: str, max_elements: int) -> int:
    """Bytes the record's tensor takes once decoded, from its checked header alone."""
    try:
        _, numel = _check_fields(fields, max_elements)
    except ArtifactError as err:
        raise ArtifactError(f"{where}: {err}") from None
    return numel * np.dtype(DTYPES[fields["dtype"]][1]).itemsize


def _check_fields(fields: Any, max_elements: int) -> tuple[RecordKind, int]:
    """Type- and range-check a record header before anything is allocated from it."""
    if not isinstance(fields, dict):
        raise ArtifactError(f"record header must be a JSON object, got {type(fields).__name__}")
    if not isinstance(fields.get("name"), str):
        raise ArtifactError("'name' must be a string")
    shape = fields.get("shape")
    if (not isinstance(shape, list) or len(shape) > 32
            or not all(_is_count(d) and d <= _MAX_DIM for d in shape)):
        raise ArtifactError(f"'shape' must be a list of at most 32 ints in [0, {_MAX_DIM}], got {shape!r:.80}")
    numel = _numel(shape)
    if numel > max_elements:
        raise ArtifactError(f"shape {shape} has {numel} elements, over the limit of {max_elements} "
                            f"(pass a larger max_elements if the file is trusted)")
    if not isinstance(fields.get("dtype"), str) or fields["dtype"] not in DTYPES:
        raise ArtifactError(f"'dtype' {fields.get('dtype')!r:.40} is not one of {list(DTYPES)}")
    if fields.get("kind") not in [k.value for k in RecordKind]:
        raise ArtifactError(f"'kind' {fields.get('kind')!r:.40} is not one of {[k.value for k in RecordKind]}")
    kind = RecordKind(fields["kind"])
    if "positions" in STREAMS[kind]:
        nnz, info = fields.get("nnz"), fields.get("positions")
        if not _is_count(nnz) or nnz > numel:
            raise ArtifactError(f"'nnz' {nnz!r:.40} must be an int in [0, {numel}]")
        if (not isinstance(info, dict) or info.get("coding") not in [c.value for c in sparse.PositionCoding]
                or not _is_count(info.get("count"))
                or "index_bits" not in info
                or not (info["index_bits"] is None or _is_count(info["index_bits"]))):
            raise ArtifactError(f"'positions' {info!r:.80} must be {{coding: bitmask|relative, "
                                f"index_bits: int|null, count: int}}")
    if "codebook" in STREAMS[kind]:
        if fields.get("dtype") not in FLOAT_DTYPES:
            raise ArtifactError(f"a {kind.value} record needs a floating dtype, got {fields['dtype']}")
        size = fields.get("codebook_size")
        if not _is_count(size) or not 1 <= size <= MAX_CODEBOOK:
            raise ArtifactError(f"'codebook_size' {size!r:.40} must be an int in [1, {MAX_CODEBOOK}]")
    stored_as = fields.get("stored_as", {})
    if not isinstance(stored_as, dict) or any(
            role not in STREAMS[kind] or role not in ("values", "codebook")
            or narrow not in NARROWER.get(fields["dtype"], ()) for role, narrow in stored_as.items()):
        raise ArtifactError(f"'stored_as' {stored_as!r:.80} must map this record's values/codebook streams to a "
                            f"float type narrower than {fields['dtype']} ({', '.join(NARROWER.get(fields['dtype'], ())) or 'none'})")
    return kind, numel


def _narrowest(t: torch.Tensor, dtype: str) -> str:
    """The first of ``NARROWER[dtype]`` that ``t`` converts to and back bit for bit, else ``dtype``."""
    t = t.detach().cpu()
    for narrow in NARROWER.get(dtype, ()) if t.numel() else ():   # an empty stream has nothing to save
        back = t.to(DTYPES[narrow][0]).to(t.dtype)
        if torch.equal(back.view(_BITS_VIEW[t.dtype]), t.view(_BITS_VIEW[t.dtype])):
            return narrow
    return dtype


def has_narrowed_streams(fields: Mapping[str, Any]) -> bool:
    """Whether a record's header stores a stream narrower than its dtype (.dsk version 2)."""
    return bool(fields.get("stored_as"))


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _codebook_candidates(name, flat, shape, dtype, keep, positions, codebook, indices, common):
    """The SPARSE_CODEBOOK record and, where it fits, the CODEBOOK one (+0.0 added for pruning)."""
    if codebook is None or indices is None:
        raise ConfigError(f"{name}: pass both codebook and indices (got only one)")
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"{name}: codebooks need a floating tensor, got {dtype}")
    cb = torch.as_tensor(codebook).detach().cpu().reshape(-1).to(flat.dtype)
    idx = torch.as_tensor(indices).detach().cpu()
    if tuple(idx.shape) != tuple(shape) or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ConfigError(f"{name}: indices must be integers of the tensor's shape {tuple(shape)}, "
                          f"got {idx.dtype} {tuple(idx.shape)}")
    idx = idx.reshape(-1).long()
    if not 1 <= cb.numel() <= MAX_CODEBOOK or (idx.numel() and (idx.min() < 0 or idx.max() >= cb.numel())):
        raise ConfigError(f"{name}: need 1..{MAX_CODEBOOK} codebook entries and indices in [0, {cb.numel()})")
    differs = keep & (cb[idx] != flat)
    if differs.any():
        raise ConfigError(f"{name}: codebook[indices] differs from the tensor at {int(differs.sum())} kept "
                          f"entries; store the quantised tensor (codebook[indices] where kept, 0 elsewhere)")
    out = {RecordKind.SPARSE_CODEBOOK: TensorRecord(kind=RecordKind.SPARSE_CODEBOOK, positions=positions,
                                                    codebook=cb, indices=idx[positions], **common)}
    zero = torch.nonzero((cb == 0) & ~torch.signbit(cb)).reshape(-1)
    if bool(keep.all()) or zero.numel():
        dense_idx = idx if bool(keep.all()) else torch.where(keep, idx, zero[:1])
        dense_cb = cb
    elif cb.numel() < MAX_CODEBOOK:  # pruned entries need a +0.0 codebook entry
        dense_cb = torch.cat([cb, torch.zeros(1, dtype=cb.dtype)])
        dense_idx = torch.where(keep, idx, torch.tensor(cb.numel()))
    else:
        return out
    out[RecordKind.CODEBOOK] = TensorRecord(kind=RecordKind.CODEBOOK, codebook=dense_cb, indices=dense_idx,
                                            **{**common, "index_bits": None})
    return out


def _keep_mask(name: str, flat: torch.Tensor, shape, mask) -> torch.Tensor:
    if mask is None:
        return flat.clone() if flat.dtype == torch.bool else flat != 0
    m = torch.as_tensor(mask).detach().cpu()
    if tuple(m.shape) != tuple(shape) or (m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all())):
        raise ConfigError(f"{name}: mask must be a bool (or 0/1, as torch.nn.utils.prune keeps it) tensor "
                          f"of shape {tuple(shape)}, got {m.dtype} {tuple(m.shape)}")
    keep = m.reshape(-1).bool()
    outside = flat[~keep] != 0
    if outside.any():
        raise ConfigError(f"{name}: {int(outside.sum())} entries outside the mask are nonzero; "
                          f"apply the mask to the tensor first")
    return keep


def _as_tensor(tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{name}: need a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach().cpu().contiguous()
    if t.dtype not in _DTYPE_NAMES:
        raise ConfigError(f"{name}: dtype {t.dtype} is not storable; supported: {', '.join(DTYPES)}")
    return t


def _parse_kind(kind, name: str) -> RecordKind:
    try:
        return RecordKind(kind)
    except ValueError:
        raise ConfigError(f"{name}: kind {kind!r} is not one of {[k.value for k in RecordKind]}") from None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _validate(r: TensorRecord) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"record {r.name!r} ({r.kind.value}): {what}")

    need(isinstance(r.name, str), "name must be a string")
    need(all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in r.shape),
         f"shape {r.shape} must be non-negative ints")
    need(isinstance(r.dtype, str) and r.dtype in DTYPES, f"dtype {r.dtype!r} is not one of {list(DTYPES)}")
    torch_dtype = DTYPES[r.dtype][0]
    present = {f: getattr(r, f) is not None for f in ("values", "positions", "codebook", "indices")}
    wanted = {"values": r.kind in (RecordKind.DENSE, RecordKind.SPARSE),
              "positions": r.kind in (RecordKind.SPARSE, RecordKind.SPARSE_CODEBOOK),
              "codebook": r.kind in (RecordKind.CODEBOOK, RecordKind.SPARSE_CODEBOOK)}
    wanted["indices"] = wanted["codebook"]
    need(present == wanted, f"needs exactly {[f for f, w in wanted.items() if w]}")
    for f in ("values", "positions", "codebook", "indices"):
        v = getattr(r, f)
        need(v is None or (isinstance(v, torch.Tensor) and v.dim() == 1), f"{f} must be a 1-D tensor")
    count = r.numel
    if r.positions is not None:
        p = r.positions
        need(p.dtype == torch.int64, "positions must be int64")
        need(p.numel() == 0 or (int(p[0]) >= 0 and int(p[-1]) < r.numel and bool((p[1:] > p[:-1]).all())),
             "positions must be strictly increasing flat indices inside the tensor")
        count = p.numel()
    if r.values is not None:
        need(r.values.dtype == torch_dtype and r.values.numel() == count,
             f"values must be {count} {r.dtype} entries, got {r.values.numel()} {r.values.dtype}")
    if r.codebook is not None:
        need(r.dtype in FLOAT_DTYPES, f"codebooks need a floating dtype, got {r.dtype}")
        k = r.codebook.numel()
        need(r.codebook.dtype == torch_dtype and 1 <= k <= MAX_CODEBOOK,
             f"codebook must be 1..{MAX_CODEBOOK} {r.dtype} entries")
        i = r.indices
        need(i.dtype == torch.int64 and i.numel() == count, f"indices must be {count} int64 entries")
        need(i.numel() == 0 or (int(i.min()) >= 0 and int(i.max()) < k), f"indices must lie in [0, {k})")
    need(r.index_bits is None or (isinstance(r.index_bits, int) and 1 <= r.index_bits <= sparse.MAX_INDEX_BITS),
         f"index_bits {r.index_bits!r} must be None or 1..{sparse.MAX_INDEX_BITS}")


def _tensor_bytes(t: torch.Tensor, dtype: str) -> bytes:
    t = t.detach().cpu().contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    elif dtype == "bool":
        t = t.view(torch.uint8)
    return t.numpy().astype(DTYPES[dtype][1], copy=False).tobytes()


def _tensor_from_bytes(data: bytes, dtype: str, count: int, *, role: str) -> torch.Tensor:
    storage = np.dtype(DTYPES[dtype][1])
    if len(data) != count * storage.itemsize:
        raise ArtifactError(f"header says {count} {dtype} {role} ({count * storage.itemsize} bytes), "
                            f"stream has {len(data)} bytes")
    arr = np.frombuffer(data, storage).astype(storage.newbyteorder("="))
    if dtype == "bool":
        if arr.size and arr.max() > 1:
            raise ArtifactError(f"bool {role} hold a byte other than 0 or 1")
        return torch.from_numpy(arr.astype(np.bool_))
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
