"""ONNX Runtime's low-bit GEMM for ``Int8DynamicLowBit`` layers: ``com.microsoft::MatMulNBits``.

The exporter turns a ``DynamicQuantLinear`` weight (``torchao.dequantize_affine`` of int8 codes
feeding ``aten.linear``) into float ops: ``Reshape -> Cast -> Sub -> Mul -> Reshape`` on the int8
codes, or, for a layer of at most 8,192 codes, a float32 initializer the exporter folded — so a 4-bit
``.onnx`` held one byte (or four) per code and ran a float GEMM. ``matmul_nbits`` replaces each such
weight -> ``Gemm`` / ``MatMul`` (+ bias ``Add``) by one ``MatMulNBits`` node reading the codes
packed as ONNX Runtime stores them: uint8 ``[N, k_blocks, block_size * bits / 8]``, each code offset
by ``2**(bits - 1)`` (the kernel's default zero point when none is given: 8 at 4 bits, 128 at 8, so
symmetric codes need no zero-point input), two 4-bit codes a byte with the first in the low nibble,
and float32 scales ``[N, k_blocks]``. The per-row int8 round trip of the activations stays in the
graph in front of it, as before.

Which layers: the program says which weights are codes (the folded ones are float in the ONNX graph
and are found by their exact bytes). ONNX Runtime 1.31's CPU kernel takes ``block_size`` 16, 32,
64, 128 or 256 only, so a groupwise layer runs it when its group is one of those (another group
keeps the float path); a per-channel layer (one scale per row) may use any block, its scale
repeated, and gets the one that stores fewest bytes.

``accuracy_level`` (``ACCURACY_LEVEL``), measured on LeNet-300-100 at batch 1 (bench/results/
lowbit_pte.md) and in the tests: 0 computes in float from the dequantized weight, so the file
computes what the module (and the ``.pte``) computes, to 1e-5; it runs in about the time of the
float path it replaces, at half its bytes. 4 lets the kernel quantize each block of the activation
to int8 again after the graph's per-row rounding: 0.73x the time of level 0, but about an
activation step away from the module — enough to flip the top-1 of 1 in 32 samples of an untrained
MLP and fail the export's parity gate (1 of 8 seeds, at 4 and at 8 bits). So 4-bit layers run at
level 0. 8-bit layers keep the float path by default: at level 0 ORT 1.31 has no 8-bit kernel on
x86 and dequantizes the whole weight on every call (5x the float path's time), and level 4 carries
the parity risk above and a float32 scale per block (312,198 B against the float path's 284,474);
pass ``accuracy_level={8: 4}`` (or ``{4: 4}``) to opt in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepshrink.core.errors import ConfigError, ExportError

BLOCK_SIZES = (16, 32, 64, 128, 256)   # ORT 1.31 CPU MatMulNBits rejects any other block_size
WIDTHS = {(-8, 7): 4, (-128, 127): 8}  # (quant_min, quant_max) of DynamicQuantLinear's codes -> bits
ACCURACY_LEVEL = {4: 0}                # by bits; a width not here keeps the float path (module doc)
_DEQUANTIZE = "torchao.dequantize_affine.default"
_LINEAR = "aten.linear.default"
_WEIGHT_OPS = {"Reshape", "Cast", "Sub", "Mul"}   # the exporter's dequantize_affine of a constant
NODE_SUFFIX = "/MatMulNBits"   # node name = layer + suffix: what ran, read back for the sidecar


@dataclass(frozen=True, eq=False)
class LowBitLinear:
    """One ``DynamicQuantLinear`` weight as the program holds it: symmetric int8 ``codes``
    [N, padded K], float32 ``scale`` [N, padded K / group]."""

    layer: str    # module name, e.g. "hidden.0"
    param: str    # the codes' name in the program and the ONNX graph, e.g. "hidden.0.qdata"
    bits: int
    group: int
    codes: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantized(self) -> np.ndarray:
        """``codes * scale`` in float32, the product the exporter's folding computes bit for bit."""
        return self.codes.astype(np.float32) * np.repeat(self.scale, self.group, axis=1)


def lowbit_linears(program) -> dict[str, LowBitLinear]:
    """``{codes name: LowBitLinear}`` of every ``aten.linear`` whose weight is a constant int8
    ``dequantize_affine`` with a ``[1, group]`` block, zero zero points and 4- or 8-bit code range,
    and whose input is itself a ``dequantize_affine`` (the activation's int8 round trip)."""
    signature = program.graph_signature
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
             **getattr(signature, "inputs_to_lifted_tensor_constants", {})}

    def constant(node):
        name = names.get(node.name) if getattr(node, "op", None) == "placeholder" else None
        if name is None:
            return None, None
        tensor = program.state_dict.get(name)
        return name, program.constants.get(name) if tensor is None else tensor

    found: dict[str, LowBitLinear] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or str(node.target) != _DEQUANTIZE or len(node.args) < 7:
            continue
        codes_node, block, scale_node, zero_node, _, qmin, qmax = node.args[:7]
        param, codes = constant(codes_node)
        _, scale = constant(scale_node)
        _, zero = constant(zero_node)
        bits = WIDTHS.get((qmin, qmax))
        if codes is None or scale is None or zero is None or bits is None or str(codes.dtype) != "torch.int8":
            continue
        if codes.dim() != 2 or list(block) != [1, block[1]] or codes.shape[1] % block[1] or bool(zero.any()):
            continue
        if scale.shape != (codes.shape[0], codes.shape[1] // block[1]):
            continue
        linears = [u for u in node.users if str(u.target) == _LINEAR and len(u.args) >= 2 and u.args[1] is node]
        if not linears or len(linears) != len(node.users):
            continue
        if not all(getattr(u.args[0], "op", None) == "call_function" and str(u.args[0].target) == _DEQUANTIZE for u in linears):
            continue   # float activations: a weight-only layer, not the int8-activation scheme
        layer = param.removesuffix(".qdata")
        found[param] = LowBitLinear(layer, param, bits, int(block[1]), codes.detach().cpu().numpy().astype(np.int8),
                                    scale.detach().cpu().float().numpy())
    return found


def block_size(bits: int, group: int, padded_in: int) -> int | None:
    """The ``block_size`` a layer runs with, or None (keeps the float path): its group if ORT takes
    it; for one group per row, the block whose codes (the last block padded) and float32 scales
    take fewest bytes."""
    if group != padded_in:
        return group if group in BLOCK_SIZES else None

    def row_bytes(b: int) -> int:
        blocks = math.ceil(padded_in / b)
        return blocks * (b * bits // 8 + 4)

    return min(BLOCK_SIZES, key=lambda b: (row_bytes(b), b))


def pack(codes: np.ndarray, scale: np.ndarray, *, bits: int, group: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' ``B`` (uint8 [N, k_blocks, block * bits / 8]) and ``scales`` (float32
    [N, k_blocks]) for symmetric ``codes`` [N, K] with one ``scale`` per ``group`` codes of a row;
    ``block`` divides ``group``, or the row is one group (its last block padded with zero codes)."""
    n, k = codes.shape
    blocks = math.ceil(k / block)
    scales = np.repeat(scale, group // block, axis=1) if group % block == 0 else scale[:, :1].repeat(blocks, axis=1)
    stored = np.zeros((n, blocks * block), np.uint8)
    stored[:, :k] = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)   # zero codes pad: 0 + offset
    stored[:, k:] = 1 << (bits - 1)
    if bits == 4:
        stored = stored[:, 0::2] | (stored[:, 1::2] << 4)
    return stored.reshape(n, blocks, block * bits // 8), np.ascontiguousarray(scales[:, :blocks], np.float32)


def matmul_nbits(model, program, *, accuracy_level: dict[int, int] | None = None) -> list[dict]:
    """Rewrite, in the ``onnx_ir`` model exported from ``program``, every ``Int8DynamicLowBit``
    layer whose weight fits (see the module doc) as ``MatMulNBits``; drop the float weight path it
    replaces. ``accuracy_level``: ``{bits: level}`` over ``ACCURACY_LEVEL`` (a width mapped to None,
    or absent, keeps the float path). Returns one record per node written:
    ``{"layer", "bits", "block_size", "accuracy_level", "K", "N"}``."""
    import onnx_ir as ir

    levels = {**ACCURACY_LEVEL, **(accuracy_level or {})}
    for bits, level in levels.items():
        if level is not None and (bits not in WIDTHS.values() or level not in range(5)):
            raise ConfigError(f"matmul_nbits: accuracy_level {{{bits}: {level}}}: widths are 4 and 8, levels 0..4 "
                              "(0 float, 4 int8 activations in the kernel)")
    if levels.get(8) not in (None, 4):
        raise ConfigError(f"matmul_nbits: accuracy_level {levels[8]} for 8-bit layers would run ONNX Runtime's unpacked "
                          "fallback (the whole weight dequantized on every call); use 4, or leave 8 out to keep the float path")
    layers = lowbit_linears(program)
    if not layers:
        return []
    graph = model.graph
    packed: dict[str, tuple] = {}
    records, dead, weights = [], [], []
    find = _WeightFinder(layers)
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul"):
            continue
        if node.op_type == "Gemm":
            a = node.attributes
            flags = (a.get_int("transA", 0), a.get_int("transB", 0), a.get_float("alpha", 1.0), a.get_float("beta", 1.0))
            if flags != (0, 1, 1.0, 1.0):   # the exporter's linear: x @ w.T + b
                continue
            layer, chain = find(node.inputs[1], transposed=False)
        else:
            layer, chain = find(node.inputs[1], transposed=True)
        if layer is None:
            continue
        n, k = layer.shape
        block = block_size(layer.bits, layer.group, k)
        level = levels.get(layer.bits)
        if block is None or level is None:
            continue
        x = node.inputs[0]
        if x is None or (x.shape is not None and x.shape.rank() and isinstance(x.shape[-1], int) and x.shape[-1] != k):
            continue
        old_nodes, bias = [node], node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None and (bias.shape is None or tuple(bias.shape) != (n,)):
            continue
        out = node.outputs[0]
        if node.op_type == "MatMul":
            add = _bias_add(out, n, graph)
            if add is not None:
                old_nodes.append(add)
                bias = next(v for v in add.inputs if v is not out)
                out = add.outputs[0]
        if layer.param not in packed:
            b, scales = pack(layer.codes, layer.scale, bits=layer.bits, group=layer.group, block=block)
            packed[layer.param] = (_initializer(graph, f"{layer.param}_nbits", b),
                                   _initializer(graph, f"{layer.layer}.scales_nbits", scales))
        b_value, scale_value = packed[layer.param]
        new = ir.node("MatMulNBits", [x, b_value, scale_value, None, None, bias], domain="com.microsoft",
                      attributes={"K": k, "N": n, "bits": layer.bits, "block_size": block, "accuracy_level": level},
                      name=f"{layer.layer}{NODE_SUFFIX}")
        weight = node.inputs[1]
        ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, [new], [out], [new.outputs[0]])
        dead.extend(chain)
        weights.append(weight)
        records.append({"layer": layer.layer, "bits": layer.bits, "block_size": block, "accuracy_level": level, "K": k, "N": n})
    if records:
        model.opset_imports.setdefault("com.microsoft", 1)
        _remove_dead(graph, dead, weights)
    return records


class _WeightFinder:
    """Which ``LowBitLinear`` a GEMM's weight input computes, and the nodes that compute it: a
    float32 initializer equal, bit for bit, to a layer's ``codes * scale`` (folded by the exporter;
    [N, K] for ``Gemm``, [K, N] for ``MatMul``), or the exporter's ``Reshape/Cast/Sub/Mul`` chain
    (under a ``Transpose`` for ``MatMul``) from the layer's int8 codes."""

    def __init__(self, layers: dict[str, LowBitLinear]) -> None:
        self.layers = layers
        self.by_shape: dict[tuple, list[LowBitLinear]] = {}
        for layer in layers.values():
            self.by_shape.setdefault(layer.shape, []).append(layer)
        self.weights: dict[str, np.ndarray] = {}   # dequantized on demand: only small layers are folded

    def __call__(self, value, *, transposed: bool) -> tuple[LowBitLinear | None, list]:
        import onnx_ir as ir

        if value is None:
            return None, []
        if value.is_initializer() and value.const_value is not None:
            if value.const_value.dtype != ir.DataType.FLOAT:
                return None, []
            array = value.const_value.numpy()
            array = array.T if transposed and array.ndim == 2 else array
            for layer in self.by_shape.get(array.shape, []):
                if layer.param not in self.weights:
                    self.weights[layer.param] = layer.dequantized()
                if np.array_equal(array, self.weights[layer.param]):
                    return layer, []
            return None, []
        chain = []
        if transposed:   # MatMul(x, Transpose(w)): the exporter's linear on a batch of sequences
            node = value.producer()
            if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != [1, 0]:
                return None, []
            chain.append(node)
            value = node.inputs[0]
        while value is not None and not value.is_initializer():
            node = value.producer()
            if node is None or node.op_type not in _WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
                return None, []
            if any(v is not None and v.const_value is None for v in node.inputs[1:]):
                return None, []   # computed from a graph input: not a constant weight
            chain.append(node)
            value = node.inputs[0]
        layer = self.layers.get(value.name) if value is not None else None
        if layer is None:
            return None, []
        stored = value.const_value.numpy() if value.const_value is not None else None
        if stored is None or stored.shape != layer.shape or not np.array_equal(stored, layer.codes):
            raise ExportError(f"ONNX low-bit rewrite: initializer {value.name!r} does not hold the codes of layer "
                              f"{layer.layer!r} in the exported program; export the module as quantize left it")
        return layer, chain


def _bias_add(out, n: int, graph):
    """The ``Add`` of a constant [N] bias that alone reads a ``MatMul``'s output, or None."""
    uses = list(out.uses())
    if len(uses) != 1 or out in graph.outputs:
        return None
    add = uses[0][0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0][1]]
    if other is None or other.const_value is None or tuple(other.const_value.shape) != (n,):
        return None
    return add


def _initializer(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    while name in graph.initializers:   # a model's own tensor may already hold the name
        name += "_"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _remove_dead(graph, nodes, weights) -> None:
    """Remove the float weight paths no node reads any more (``nodes``, from the GEMMs' weight inputs
    ``weights`` back to the codes), and the initializers only they read."""
    inputs = list(weights)
    for node in nodes:   # each chain runs from the GEMM back to the codes, so users go first
        if node.graph is graph and not any(v.uses() or v in graph.outputs for v in node.outputs):
            inputs.extend(v for v in node.inputs if v is not None)
            graph.remove(node, safe=True)
    for value in inputs:
        if value.is_initializer() and not value.uses() and value not in graph.outputs and value.name in graph.initializers:
            graph.initializers.pop(value.name)


def onnx_kernels(path: str | Path) -> dict[str, str]:
    """``{layer: what runs it}`` for the ``MatMulNBits`` nodes ``matmul_nbits`` wrote in the file."""
    import onnx

    kernels = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and node.name.endswith(NODE_SUFFIX):
            a = {attr.name: attr.i for attr in node.attribute}
            activations = "int8 per block in the kernel" if a.get("accuracy_level") == 4 else "float"
            kernels[node.name.removesuffix(NODE_SUFFIX)] = (
                f"onnxruntime MatMulNBits: {a.get('bits')}-bit codes in blocks of {a.get('block_size')}, "
                f"accuracy_level {a.get('accuracy_level')} (activations {activations})")
    return kernels


__all__ = ["matmul_nbits", "lowbit_linears", "block_size", "pack", "onnx_kernels", "LowBitLinear", "ACCURACY_LEVEL",
           "BLOCK_SIZES"]
