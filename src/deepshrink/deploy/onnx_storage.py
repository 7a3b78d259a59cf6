"""Weights stored as their information, decoded when ONNX Runtime loads the file.

A pruned or low-bit weight is still a dense float32 (or int8) initializer in the ``.onnx`` the
exporter writes: 4 bytes for a weight that is one of 16 levels, 4 bytes for a pruned zero. The
file is then as large as the dense model, whatever was done to it. ``compact_initializers``
rewrites each such initializer as the few arrays it is made of and a chain of constant nodes that
rebuilds it exactly (the arrays named ``<weight>:<role>``):

- ``grid``: every row (output channel) is an integer multiple of one float32 scale, the codes in
  ``[-127, 127]`` (``WeightOnly``, ``WeightQAT``, ``Codebook(grid="int8")``; the last axis of a 2-D
  weight too, as a ``MatMul`` reads it) -> integer codes, ``Cast`` to float, ``Mul`` by the scales;
- ``table``: at most 256 distinct values in the tensor (``Codebook``: one shared codebook) ->
  indices into the levels, ``Gather``;
- the integer codes or indices, or an int8 initializer itself (a QDQ weight), are then stored in 4
  bits when they fit (two a byte, ``BitShift``/``BitwiseAnd``), and, where most are zero, as the
  nonzero values and the gaps between them (one byte a gap, ``CumSum`` -> ``ScatterElements``;
  a filler byte where two are more than ``MAX_GAP`` apart);
- a float tensor that is neither (pruned fp32 weights) may still be stored sparse.

The chain reads only initializers, so ONNX Runtime constant-folds it when the session is created
(``ConstantFolding``, basic level, on by default): the session holds the same weights as the plain
file's, its kernels and their speed are the same (it never folds ``DequantizeLinear``, so a QDQ
weight is decoded to the int8 codes and its QDQ fusion still sees a constant), and only the bytes
on disk change. Every chain is run through ONNX Runtime before it replaces a weight, and its output
compared with the weight (``==``: a pruned ``-0.0`` comes back as ``0.0``); a chain that does not
rebuild its weight exactly, or does not save at least ``MIN_SAVING`` of its bytes, is not used.

Which weights were stored so is written into the model (``metadata_props[METADATA]``: per weight
its name, shape and nonzero count; the export's sidecar adds encoding and bytes) so tools that count a file's parameters
(``evaluation.counting.onnx_parameter_counts``, ``storage_records``) read the weights, not the pieces.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from deepshrink.evaluation.counting import STORAGE_METADATA as METADATA, STORAGE_PART as PART
from deepshrink.ops.grids import grid_codes

MIN_ELEMENTS = 256    # smaller initializers (biases, scales, shapes) stay as they are
MIN_SAVING = 0.10     # a rewrite must save at least this fraction of the tensor's bytes
MAX_GAP = 255         # one uint8 per nonzero: the distance to the previous one, minus 1 (0..254) ...
FILLER = 255          # ... or this byte: 255 further on, no value there
_QPARAM_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Chain:
    """The arrays a weight is stored as, and the nodes that rebuild it from them: ``nodes`` are
    ``(op, inputs, output, attributes)`` over the names of ``arrays`` and of earlier outputs."""

    name: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[tuple[str, list[str], str, dict]] = field(default_factory=list)
    encoding: list[str] = field(default_factory=list)
    _count: int = 0

    def array(self, role: str, value: np.ndarray) -> str:
        key = f"{self.name}{PART}{role}"
        self.arrays[key] = np.ascontiguousarray(value)
        return key

    def constant(self, role: str, value) -> str:
        """A small constant every chain may share (one initializer in the file): ``<PART><role>``."""
        key = f"{PART}{role}"
        self.shared[key] = np.asarray(value)
        return key

    def op(self, op_type: str, inputs: list[str], **attributes) -> str:
        self._count += 1
        out = f"{self.name}{PART}{self._count}"
        self.nodes.append((op_type, inputs, out, attributes))
        return out

    @property
    def output(self) -> str:
        return self.nodes[-1][2]

    @property
    def stored_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# -- planning: numpy only -------------------------------------------------------------------------

def plan(name: str, weight: np.ndarray) -> Chain | None:
    """The smallest exact chain for ``weight`` (float32 or int8), or None when none saves
    ``MIN_SAVING`` of its bytes."""
    if weight.size < MIN_ELEMENTS or weight.dtype not in (np.float32, np.int8):
        return None
    candidates = []
    if weight.dtype == np.int8:
        candidates.append(_integers(Chain(name), weight.astype(np.int32), signed=True, to="int8"))
    else:
        grid = grid_codes(weight)
        if grid is not None:
            codes, scales = grid
            chain = Chain(name, encoding=["grid"])
            candidates.append(_integers(chain, codes, signed=True, to="float", scales=scales, weight_shape=weight.shape))
        table = table_codes(weight)
        if table is not None:
            indices, levels = table
            candidates.append(_integers(Chain(name, encoding=["table"]), indices, signed=False, to="float", levels=levels))
        candidates.append(_sparse_float(Chain(name), weight))
    candidates = [c for c in candidates if c is not None]
    if not candidates:
        return None
    best = min(candidates, key=lambda c: c.stored_bytes)
    return best if best.stored_bytes <= (1 - MIN_SAVING) * weight.nbytes else None


def table_codes(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(indices, levels)`` with ``levels[indices] == weight``, for a weight of at most 256
    distinct values; 0.0 (if present) is level 0, so pruned weights are index 0. None otherwise."""
    levels = np.unique(weight)
    if levels.size > 256:
        return None
    if 0.0 in levels:
        levels = np.concatenate([[0.0], levels[levels != 0.0]]).astype(np.float32)
    order = np.argsort(levels)   # sorted position -> position in levels
    return order[np.searchsorted(levels[order], weight)].astype(np.int32), levels


def _integers(chain: Chain, values: np.ndarray, *, signed: bool, to: str, scales: np.ndarray | None = None,
              levels: np.ndarray | None = None, weight_shape: tuple | None = None) -> Chain | None:
    """Store integer ``values`` (signed codes, or indices with 0 the zero level) in 4 or 8 bits,
    dense or sparse, whichever is smaller, then decode them to ``to``: ``"int8"`` (the tensor
    itself), ``"float"`` times ``scales`` or looked up in ``levels``. Sparse indices are stored
    minus 1 (a stored index is never 0), so 16 levels besides zero still fit 4 bits."""
    flat = values.reshape(-1)
    nonzero = flat[flat != 0] - (0 if signed else 1)
    dense_bits, sparse_bits = _width(flat, signed), _width(nonzero, signed)
    options = {}
    if dense_bits and (dense_bits == 4 or to != "int8"):   # int8 stored as int8: nothing to gain
        options["dense"] = flat.size * dense_bits / 8
    if sparse_bits and nonzero.size * (1 + sparse_bits / 8) < flat.size * (dense_bits or 8) / 8:   # can pay
        gaps = _gaps(flat != 0)
        options["sparse"] = gaps.size + nonzero.size * sparse_bits / 8
    if not options:
        return None
    if min(options, key=options.get) == "sparse":
        stored = _stored(chain, nonzero, sparse_bits, signed, "values")
        if not signed:
            stored = chain.op("Add", [stored, chain.constant("i32_1", np.int32(1))])
        out = _scatter(chain, gaps, stored, flat.size, "int32")
        chain.encoding.append(f"sparse {sparse_bits}-bit")
    else:
        out = _stored(chain, flat, dense_bits, signed, "codes")
        chain.encoding.append(f"{dense_bits}-bit")
    shape = chain.array("shape", np.array(values.shape, np.int64))
    out = chain.op("Reshape", [out, shape])
    if to == "int8":
        chain.op("Cast", [out], to="int8")
    elif scales is not None:
        out = chain.op("Mul", [chain.op("Cast", [out], to="float"), chain.array("scales", scales.astype(np.float32))])
        if weight_shape is not None and tuple(weight_shape) != values.shape:   # groups back to rows
            chain.op("Reshape", [out, chain.array("weight_shape", np.array(weight_shape, np.int64))])
    else:
        chain.op("Gather", [chain.array("levels", levels.astype(np.float32)), out], axis=0)
    return chain


def _width(values: np.ndarray, signed: bool) -> int | None:
    """4 or 8: the bits that hold every value (signed: two's complement ranges); None if 8 do not."""
    if values.size == 0:
        return 4
    low, high = int(values.min()), int(values.max())
    for bits in (4, 8):
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if lo <= low and high <= hi:
            return bits
    return None


def _stored(chain: Chain, flat: np.ndarray, bits: int, signed: bool, role: str) -> str:
    """A 1-D array of integers as bytes: int8/uint8 at 8 bits, two a byte at 4 (``v + 8`` for
    signed values; the first in the high nibble). Returns the int32 values' name."""
    if bits == 8:
        return chain.op("Cast", [chain.array(role, flat.astype(np.int8 if signed else np.uint8))], to="int32")
    biased = (flat + (8 if signed else 0)).astype(np.uint8)
    if biased.size % 2:
        biased = np.concatenate([biased, np.zeros(1, np.uint8)])
    packed = chain.array(role, (biased[0::2] << 4) | biased[1::2])
    high = chain.op("BitShift", [packed, chain.constant("u8_4", np.uint8(4))], direction="RIGHT")
    low = chain.op("BitwiseAnd", [packed, chain.constant("u8_15", np.uint8(15))])
    axis = chain.constant("i64_last", np.array([-1], np.int64))
    pairs = chain.op("Concat", [chain.op("Unsqueeze", [high, axis]), chain.op("Unsqueeze", [low, axis])], axis=-1)
    flat_out = chain.op("Reshape", [pairs, chain.constant("i64_last", np.array([-1], np.int64))])
    if flat.size % 2:
        flat_out = chain.op("Slice", [flat_out, chain.constant("i64_start", np.array([0], np.int64)),
                                      chain.array("end", np.array([flat.size], np.int64))])
    out = chain.op("Cast", [flat_out], to="int32")
    return chain.op("Sub", [out, chain.constant("i32_8", np.int32(8))]) if signed else out


def _gaps(nonzero: np.ndarray) -> np.ndarray:
    """One byte per nonzero entry, in order: its distance to the previous position, minus 1
    (0..254); where two are farther apart than ``MAX_GAP``, filler bytes 255 advance by 255
    without a value."""
    distance = np.diff(np.flatnonzero(nonzero), prepend=-1)
    fillers = (distance - 1) // MAX_GAP
    out = np.full(int(fillers.sum()) + distance.size, FILLER, np.uint8)
    out[np.cumsum(fillers + 1) - 1] = distance - 1 - MAX_GAP * fillers
    return out


def _scatter(chain: Chain, gaps: np.ndarray, values: str, size: int, dtype: str) -> str:
    """The dense 1-D tensor: ``values`` at the positions the gaps give, zeros elsewhere. A filler
    entry writes (the value of a neighbour) to one extra slot past the end, sliced off: ONNX
    Runtime does not constant-fold ``Compress``, which would drop the fillers instead."""
    raw = chain.op("Cast", [chain.array("gaps", gaps)], to="int64")
    filler = chain.op("Equal", [raw, chain.constant("i64_filler", np.int64(FILLER))])
    one = chain.constant("i64_1", np.int64(1))
    steps = chain.op("Where", [filler, chain.constant("i64_max_gap", np.int64(MAX_GAP)), chain.op("Add", [raw, one])])
    ends = chain.op("Sub", [chain.op("CumSum", [steps, chain.constant("i64_0", np.int64(0))]), one])
    end = chain.array("size", np.array([size], np.int64))
    positions = chain.op("Where", [filler, end, ends])
    real = chain.op("Cast", [chain.op("Not", [filler])], to="int64")
    index = chain.op("Sub", [chain.op("CumSum", [real, chain.constant("i64_0", np.int64(0))]), one])   # -1 before the first
    entries = chain.op("Gather", [values, index], axis=0)
    zeros = chain.constant(f"{dtype}_0", np.zeros((), np.float32 if dtype == "float" else np.int32))
    dense = chain.op("Expand", [zeros, chain.array("size_1", np.array([size + 1], np.int64))])
    scattered = chain.op("ScatterElements", [dense, positions, entries], axis=0)
    return chain.op("Slice", [scattered, chain.constant("i64_start", np.array([0], np.int64)), end])


def _sparse_float(chain: Chain, weight: np.ndarray) -> Chain | None:
    flat = weight.reshape(-1)
    nonzero = flat != 0
    if 5 * int(nonzero.sum()) >= flat.nbytes:   # 4 bytes a value and at least 1 a gap: cannot pay
        return None
    gaps = _gaps(nonzero)
    if gaps.size + 4 * int(nonzero.sum()) >= flat.nbytes:
        return None
    out = _scatter(chain, gaps, chain.array("values", flat[nonzero]), flat.size, "float")
    chain.op("Reshape", [out, chain.array("shape", np.array(weight.shape, np.int64))])
    chain.encoding.append("sparse float32")
    return chain


# -- the ONNX graph: onnx_ir ----------------------------------------------------------------------

def compact_initializers(model) -> list[dict]:
    """Rewrite the main graph's weights of an ``onnx_ir`` model as exact decoding chains (module
    doc); returns one record per weight rewritten: name, shape, nonzero, encoding, bytes."""
    import onnx_ir as ir

    graph = model.graph
    qparams = {id(node.inputs[i]) for node in graph if node.op_type in _QPARAM_OPS
               for i in (1, 2) if len(node.inputs) > i and node.inputs[i] is not None}
    chains = {}
    for name, value in list(graph.initializers.items()):
        if any(user.domain not in ("", "ai.onnx") for user, _ in value.uses()):
            continue   # contrib kernels (MatMulNBits) pack their constants themselves
        if id(value) in qparams or value in graph.inputs or value.const_value is None or not value.uses():
            continue
        chain = plan(name, value.const_value.numpy())
        if chain is not None:
            chains[name] = chain
    chains = {name: chain for name, chain in chains.items() if name in _exact(chains, graph, model.opset_imports)}
    records, shared = [], {}
    first = graph[0] if len(graph) else None
    for name, chain in chains.items():
        value = graph.initializers[name]
        weight = value.const_value.numpy()
        made = {key: ir.Value(name=key, const_value=ir.tensor(array)) for key, array in chain.arrays.items()}
        for v in made.values():
            graph.register_initializer(v)
        for key, array in chain.shared.items():
            if key not in shared:
                shared[key] = ir.Value(name=key, const_value=ir.tensor(array))
                graph.register_initializer(shared[key])
        made.update(shared)
        nodes = []
        for op_type, inputs, out, attributes in chain.nodes:
            if "to" in attributes:
                attributes = {"to": {"int8": ir.DataType.INT8, "int32": ir.DataType.INT32, "int64": ir.DataType.INT64,
                                     "float": ir.DataType.FLOAT}[attributes["to"]]}
            node = ir.node(op_type, [made[i] for i in inputs], attributes=attributes)
            node.outputs[0].name = out
            made[out] = node.outputs[0]
            nodes.append(node)
        made[chain.output].shape, made[chain.output].dtype = value.shape, value.dtype
        if first is None:
            graph.extend(nodes)
        else:
            graph.insert_before(first, nodes)
        value.replace_all_uses_with(made[chain.output])
        graph.initializers.pop(name)
        records.append({"name": name, "shape": list(weight.shape), "nonzero": int(np.count_nonzero(weight)),
                        "encoding": " + ".join(chain.encoding), "bytes": int(weight.nbytes),
                        "stored_bytes": int(chain.stored_bytes)})
    if records:   # what counting needs, in the file itself; the sidecar gets the full records
        model.metadata_props[METADATA] = json.dumps([[r["name"], r["shape"], r["nonzero"]] for r in records],
                                                    separators=(",", ":"))
    return records


def _exact(chains: dict[str, Chain], graph, opsets: dict[str, int]) -> set[str]:
    """The names whose chain, run by ONNX Runtime, gives back the weight exactly."""
    if not chains:
        return set()
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    nodes, inits, outputs, shared = [], [], [], {}
    for chain in chains.values():
        inits += [numpy_helper.from_array(a, k) for k, a in chain.arrays.items()]
        shared.update(chain.shared)
        for op_type, inputs, out, attributes in chain.nodes:
            if "to" in attributes:
                attributes = {"to": {"int8": onnx.TensorProto.INT8, "int32": onnx.TensorProto.INT32,
                                     "int64": onnx.TensorProto.INT64, "float": onnx.TensorProto.FLOAT}[attributes["to"]]}
            nodes.append(helper.make_node(op_type, inputs, [out], **attributes))
        weight = graph.initializers[chain.name].const_value.numpy()
        outputs.append(helper.make_tensor_value_info(chain.output, helper.np_dtype_to_tensor_dtype(weight.dtype), weight.shape))
    inits += [numpy_helper.from_array(a, k) for k, a in shared.items()]
    opset = [helper.make_opsetid("", opsets.get("", 20))]
    probe = helper.make_model(helper.make_graph(nodes, "decode", [], outputs, inits), opset_imports=opset, ir_version=10)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # run the chains, not their folding
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        decoded = session.run(None, {})
    except Exception:
        return set()
    exact = set()
    for (name, chain), got in zip(chains.items(), decoded):
        weight = graph.initializers[name].const_value.numpy()
        if got.dtype == weight.dtype and got.shape == weight.shape and np.array_equal(got, weight):
            exact.add(name)
    return exact

