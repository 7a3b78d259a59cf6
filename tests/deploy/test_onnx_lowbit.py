"""deploy.onnx_lowbit: Int8DynamicLowBit layers as ONNX Runtime's MatMulNBits in the .onnx.

Small seeded MLPs quantized at 4 bits in groups of 32 and at 8 bits per channel, each exported once
(module fixture): the graph runs MatMulNBits where the layer fits, its packed initializers hold
exactly the module's codes and scales, the file is as big as those say, and ONNX Runtime computes
what the module computes. Layers that do not fit (a group of 96; 8-bit by default) keep the float
path and still pass the export's parity gate.
"""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import deepshrink
from deepshrink.core.errors import ConfigError
from deepshrink.deploy import export, onnx_lowbit
from deepshrink.deploy.onnx_lowbit import block_size, matmul_nbits, pack
from deepshrink.evaluation.runners import open_runner
from deepshrink.quantization.lowbit import DynamicQuantLinear, Int8DynamicLowBit

Q4 = Int8DynamicLowBit(bits=4, group_size=32)
Q8 = Int8DynamicLowBit(bits=8)
NBITS8, FLOAT4 = {8: 4}, {4: None}   # ACCURACY_LEVEL overrides: 8-bit layers opted in; 4-bit kept on the float path
CASES = {   # name: (in, hidden, config, batch shape without the features, ACCURACY_LEVEL override)
    "q4": (64, 32, Q4, (64,), {}),
    "q4_float": (64, 32, Q4, (64,), FLOAT4),
    "q4_pad": (100, 48, Q4, (64,), {}),          # 100 -> 128 inputs, 48 -> 64
    "q4_seq": (64, 32, Q4, (8, 5), {}),          # [batch, seq, features]: MatMul + Add, not Gemm
    "q8": (64, 32, Q8, (64,), {}),
    "q8_nbits": (64, 32, Q8, (64,), NBITS8),
    "q8_pad_nbits": (100, 48, Q8, (64,), NBITS8),
    "g96": (192, 192, Int8DynamicLowBit(bits=4, group_size=96), (64,), {}),   # 36,864 codes: not folded
}


pytestmark = pytest.mark.usefixtures("one_thread")


class Exported:
    """One case quantized and exported on first use: module, input, ExportResult, ONNX graph, sidecar."""

    def __init__(self, root) -> None:
        self.root, self.done = root, {}

    def __getitem__(self, name: str):
        if name not in self.done:
            inputs, hidden, config, lead, levels = CASES[name]
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 10)).eval()
            model = deepshrink.quantize(model, config, data=None)
            x = torch.randn(*lead, inputs, generator=torch.Generator().manual_seed(1))
            with mock.patch.dict(onnx_lowbit.ACCURACY_LEVEL, levels):
                result = export(model, self.root / f"{name}.onnx", example_input=x)
            side = json.loads(result.path.with_name(result.path.name + ".json").read_text())
            self.done[name] = (model, x, result, onnx.load(str(result.path)), side)
        return self.done[name]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("onnx_lowbit"))


def nbits_nodes(graph) -> list:
    return [n for n in graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]


def attrs(node) -> dict:
    return {a.name: a.i for a in node.attribute}


def initializer(graph, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in graph.initializer if t.name == name))


def unpack(b: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' B [N, blocks, bytes] back to signed codes [N, blocks * block]: first code of a
    byte in the low nibble, offset 2**(bits - 1) (the default zero point). Written independently of
    ``onnx_lowbit.pack``."""
    flat = b.reshape(b.shape[0], -1)
    if bits == 4:
        flat = np.stack([flat & 15, flat >> 4], axis=-1).reshape(b.shape[0], -1)
    return flat.astype(np.int16) - (1 << (bits - 1))


@pytest.mark.parametrize("name, expected", [
    ("q4", [(64, 32, 4, 32, 0), (32, 10, 4, 32, 0)]),
    ("q4_pad", [(128, 48, 4, 32, 0), (64, 10, 4, 32, 0)]),
    ("q4_seq", [(64, 32, 4, 32, 0), (32, 10, 4, 32, 0)]),
    ("q8_nbits", [(64, 32, 8, 64, 4), (32, 10, 8, 32, 4)]),
    # per channel: the block storing fewest bytes, 100 -> one of 128 (28 codes padding); 48 -> three of 16
    ("q8_pad_nbits", [(100, 48, 8, 128, 4), (48, 10, 8, 16, 4)]),
])
def test_lowbit_layers_run_as_matmul_nbits(exported, name, expected):
    model, _, result, proto, side = exported[name]
    graph = proto.graph
    nodes = nbits_nodes(graph)
    assert [(a["K"], a["N"], a["bits"], a["block_size"], a["accuracy_level"]) for a in map(attrs, nodes)] == expected
    assert [n.name for n in nodes] == ["0/MatMulNBits", "2/MatMulNBits"]
    assert not [n.op_type for n in graph.node if n.op_type in ("Gemm", "MatMul", "Transpose")]
    # the float weight path is gone: no int8 codes, no folded float weights, only the packed ones
    assert sorted(t.name for t in graph.initializer if len(t.dims) >= 2) == [
        "0.qdata_nbits", "0.scales_nbits", "2.qdata_nbits", "2.scales_nbits"]
    assert [n.input[5] for n in nodes] == ["0.bias", "2.bias"]   # MatMul's bias Add folded in too (q4_seq)
    assert {o.domain: o.version for o in proto.opset_import}["com.microsoft"] == 1
    assert result.parity_passed
    level = expected[0][4]
    kernel = (f"onnxruntime MatMulNBits: {expected[0][2]}-bit codes in blocks of {expected[0][3]}, accuracy_level {level} "
              f"(activations {'float' if level == 0 else 'int8 per block in the kernel'})")
    assert side["runtime_weights"]["0"]["kernel"] == kernel


@pytest.mark.parametrize("name", ["q4", "q4_pad", "q8_nbits", "q8_pad_nbits"])
def test_packed_weights_unpack_to_exactly_the_module_codes_and_scales(exported, name):
    model, _, _, proto, _ = exported[name]
    for node, layer in zip(nbits_nodes(proto.graph), (model[0], model[2]), strict=True):
        assert isinstance(layer, DynamicQuantLinear)
        a = attrs(node)
        b, scales = initializer(proto.graph, node.input[1]), initializer(proto.graph, node.input[2])
        n, k, block, bits = a["N"], a["K"], a["block_size"], a["bits"]
        blocks = -(-k // block)
        assert b.dtype == np.uint8 and b.shape == (n, blocks, block * bits // 8)
        assert scales.dtype == np.float32 and scales.shape == (n, blocks)
        codes = unpack(b, bits)
        assert np.array_equal(codes[:, :k], layer.qdata.numpy())   # exact round trip
        assert not codes[:, k:].any()                                # the last block's padding is zero codes
        # groupwise: block = group, one scale each; per channel: the row's one scale in every block
        expected = layer.scale.numpy() if layer.group < k else np.repeat(layer.scale.numpy(), blocks, axis=1)
        assert np.array_equal(scales, expected)


def test_4bit_file_is_smaller_than_8bit_by_the_packed_bytes(exported):
    # 64 -> 32 -> 10: no layer is padded, so both graphs differ only in the packed initializers
    small4, small8 = exported["q4"][2], exported["q8_nbits"][2]

    def payload(bits: int, k: int, n: int, block: int) -> int:
        blocks = -(-k // block)
        return n * blocks * block * bits // 8 + n * blocks * 4   # codes + float32 scales

    four = payload(4, 64, 32, 32) + payload(4, 32, 10, 32)      # 1,280 + 200
    eight = payload(8, 64, 32, 64) + payload(8, 32, 10, 32)     # 2,176 + 360
    assert (four, eight) == (1480, 2536)
    for result, expected in ((small4, four), (small8, eight)):
        proto = onnx.load(str(result.path))
        assert sum(initializer(proto.graph, name).nbytes for node in nbits_nodes(proto.graph) for name in node.input[1:3]) == expected
    assert small8.file_bytes - small4.file_bytes == eight - four == 1056
    # the float path it replaces: both weights of 64 -> 32 -> 10 are small enough for the exporter to fold
    # them to float32 (4 B a code), and deploy.onnx_storage stores them back as two 4-bit codes a byte and
    # one float32 scale per group of 32, decoded when ONNX Runtime loads the file
    _, _, float_path, proto, side = exported["q4_float"]
    assert [(w["name"], w["encoding"]) for w in side["stored_weights"]] == [("view_12", "grid + 4-bit"), ("view_25", "grid + 4-bit")]
    stored = {t.name: t for t in proto.graph.initializer}
    assert [len(stored[f"{w}:codes"].raw_data) for w in ("view_12", "view_25")] == [32 * 64 // 2, 10 * 32 // 2]
    assert [len(stored[f"{w}:scales"].raw_data) for w in ("view_12", "view_25")] == [4 * 32 * 2, 4 * 10 * 1]
    assert 0 < float_path.file_bytes - small4.file_bytes <= 1_100   # measured 1,069: the decoding nodes


@pytest.mark.parametrize("name, bound", [
    ("q4", 1e-5), ("q4_pad", 1e-5), ("q4_seq", 1e-5),   # level 0, measured <= 2.4e-7 of the output range
    ("q8_nbits", 0.01), ("q8_pad_nbits", 0.01),        # level 4: int8 activations again per block, measured <= 0.4 %
])
def test_onnx_runtime_computes_what_the_module_computes(exported, name, bound):
    model, x, result, _, _ = exported[name]
    with torch.no_grad():
        reference = model(x)
    produced = open_runner(result.path, threads=1).predict(x)
    span = float(reference.max() - reference.min())
    assert float((produced - reference).abs().max()) <= bound * span
    assert float((produced.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.97


@pytest.mark.parametrize("name", ["g96", "q8", "q4_float"])
def test_a_layer_that_does_not_fit_keeps_the_float_path(exported, name):
    model, x, result, proto, side = exported[name]
    assert not nbits_nodes(proto.graph)
    assert [n.op_type for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")] == ["Gemm", "Gemm"]
    assert result.parity_passed and result.parity_max_abs_diff < 1e-5
    assert side["runtime_weights"]["0"]["kernel"] == "onnx: int8 codes, dequantized in the graph"


def test_block_size_is_the_group_or_the_fewest_bytes_per_row():
    assert block_size(4, 32, 800) == 32 and block_size(4, 256, 1024) == 256
    assert block_size(4, 96, 192) is None and block_size(4, 512, 1024) is None   # ORT 1.31 takes 16..256
    # one group per row: 784 inputs at 8 bits -> 13 blocks of 64 (832 B + 52 B of scales) beats 25 of 32 (800 + 100)
    assert block_size(8, 784, 784) == 64 and block_size(8, 100, 100) == 128 and block_size(4, 800, 800) == 64


def test_pack_pads_the_last_block_and_repeats_a_row_scale():
    codes = np.arange(-10, 10, dtype=np.int8).reshape(1, 20)
    b, scales = pack(codes, np.array([[0.5]], np.float32), bits=8, group=20, block=16)
    assert b.shape == (1, 2, 16) and scales.tolist() == [[0.5, 0.5]]
    assert b.reshape(-1).tolist() == list(range(118, 138)) + [128] * 12
    b4, _ = pack(np.array([[-8, 7] * 8], np.int8), np.ones((1, 1), np.float32), bits=4, group=16, block=16)
    assert b4.reshape(-1).tolist() == [0xF0] * 8   # -8 + 8 = 0 in the low nibble, 7 + 8 = 15 in the high one


def test_accuracy_level_must_be_one_the_kernel_runs():
    with pytest.raises(ConfigError, match="8-bit layers would run ONNX Runtime's unpacked fallback"):
        matmul_nbits(None, None, accuracy_level={8: 0})
    with pytest.raises(ConfigError, match="widths are 4 and 8, levels 0..4"):
        matmul_nbits(None, None, accuracy_level={4: 7})
