"""Weights stored as their codes in the .onnx: exact, folded when ONNX Runtime loads the file."""
from __future__ import annotations

import json
from unittest import mock

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import deepshrink
from deepshrink.core.counting import parameter_counts
from deepshrink.deploy import export, onnx_storage
from deepshrink.deploy.onnx_storage import FILLER, MAX_GAP, compact_initializers
from deepshrink.evaluation.counting import onnx_parameter_counts, storage_records
from deepshrink.quantization import WeightOnly

ROWS, COLS = 48, 96
pytestmark = pytest.mark.usefixtures("one_thread")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _on_grid(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales.astype(np.float32)


def _pruned(weight: np.ndarray, fraction: float, seed: int = 1) -> np.ndarray:
    return np.where(_rng(seed).random(weight.shape) < fraction, 0, weight).astype(weight.dtype)


def _grid8() -> np.ndarray:
    return _on_grid(_rng().integers(-127, 128, (ROWS, COLS)), _rng(1).uniform(1e-3, 1e-2, (ROWS, 1)))


def _grid4() -> np.ndarray:
    return _on_grid(_rng().integers(-7, 8, (ROWS, COLS)), _rng(1).uniform(1e-2, 1e-1, (ROWS, 1)))


def _groups4() -> np.ndarray:   # one scale per 32 weights of a row
    codes = _rng().integers(-7, 8, (ROWS, COLS // 32, 32))
    return _on_grid(codes, _rng(1).uniform(1e-2, 1e-1, (ROWS, COLS // 32, 1))).reshape(ROWS, COLS)


def _codebook() -> np.ndarray:  # 16 shared levels and the pruned zeros (90 %): 17 values
    levels = np.sort(_rng(2).standard_normal(16)).astype(np.float32)
    return _pruned(levels[_rng().integers(0, 16, (ROWS, COLS))], 0.9)


CASES = {   # name: (weight, whether an int8 QDQ weight, the encoding, the bytes stored)
    "int8 grid per row": (_grid8, False, "grid + 8-bit", ROWS * COLS + 4 * ROWS + 16),
    "4-bit grid per row": (_grid4, False, "grid + 4-bit", ROWS * COLS // 2 + 4 * ROWS + 16),
    "4-bit grid per group of 32": (_groups4, False, "grid + 4-bit", ROWS * COLS // 2 + 4 * ROWS * 3 + 24 + 16),
    "16-level codebook, 90 % pruned": (_codebook, False, "table + sparse 4-bit", None),
    "fp32, 95 % pruned": (lambda: _pruned(_rng().standard_normal((ROWS, COLS)).astype(np.float32), 0.95), False,
                          "sparse float32", None),
    "int8 QDQ weight, 93 % pruned": (lambda: _pruned(_rng().integers(-127, 128, (ROWS, COLS)).astype(np.int8), 0.93),
                                     True, "sparse 8-bit", None),
}


def gemm_model(weight: np.ndarray, qdq: bool) -> onnx.ModelProto:
    """x [1, COLS] -> Gemm with ``weight`` [ROWS, COLS] (through a per-row DequantizeLinear if ``qdq``)."""
    inits, nodes, w = [numpy_helper.from_array(weight, "w")], [], "w"
    if qdq:
        inits += [numpy_helper.from_array(np.full(ROWS, 0.01, np.float32), "s"), numpy_helper.from_array(np.zeros(ROWS, np.int8), "z")]
        nodes.append(helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0))
        w = "wf"
    nodes.append(helper.make_node("Gemm", ["x", w], ["y"], transB=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, COLS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ROWS])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def compacted(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict]]:
    model = ir.from_proto(proto)
    records = compact_initializers(model)
    return ir.to_proto(model), records


def session(proto: onnx.ModelProto, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if optimized:   # the graph as the session holds it after loading (basic level: constant folding)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", list(CASES))
def test_each_kind_of_weight_is_stored_as_its_codes_and_loads_as_the_same_weight(case, tmp_path):
    make, qdq, encoding, stored_bytes = CASES[case]
    weight = make()
    plain = gemm_model(weight, qdq)
    small, records = compacted(plain)
    assert [(r["name"], r["encoding"], r["shape"], r["nonzero"]) for r in records] == \
        [("w", encoding, [ROWS, COLS], int(np.count_nonzero(weight)))]
    if stored_bytes is not None:
        assert records[0]["stored_bytes"] == stored_bytes
    assert small.ByteSize() < plain.ByteSize() - 0.5 * weight.nbytes
    x = _rng(5).standard_normal((1, COLS)).astype(np.float32)
    assert np.array_equal(session(small).run(None, {"x": x})[0], session(plain).run(None, {"x": x})[0])
    # the decoding nodes fold when the session loads the file: it then holds the plain file's graph and weights
    session(small, str(tmp_path / "small.onnx")), session(plain, str(tmp_path / "plain.onnx"))
    loaded, reference = onnx.load(str(tmp_path / "small.onnx")), onnx.load(str(tmp_path / "plain.onnx"))
    assert [n.op_type for n in loaded.graph.node] == [n.op_type for n in reference.graph.node]
    weights = sorted((numpy_helper.to_array(t) for t in loaded.graph.initializer if t.dims == [ROWS, COLS]), key=str)
    assert len(weights) == 1 and np.array_equal(weights[0], weight)


def test_a_plain_float_weight_is_left_as_it_is():
    plain = gemm_model(_rng().standard_normal((ROWS, COLS)).astype(np.float32), qdq=False)
    small, records = compacted(plain)
    assert records == [] and [t.name for t in small.graph.initializer] == ["w"] and not small.metadata_props


def test_nonzeros_farther_apart_than_a_byte_get_filler_bytes():
    flat = np.zeros(ROWS * COLS, np.float32)
    flat[[3, 3 + MAX_GAP, 3 + 3 * MAX_GAP + 1, ROWS * COLS - 1]] = [1.5, -2.0, 0.25, 4.0]
    # 3: gap 3; 258: 254; 769 is 511 on: two fillers (255 each), then 0; 4607 is 3838 on: 15 fillers, then 12
    assert onnx_storage._gaps(flat != 0).tolist() == [3, 254, FILLER, FILLER, 0] + [FILLER] * 15 + [12]
    small, records = compacted(gemm_model(flat.reshape(ROWS, COLS), qdq=False))
    assert records[0]["encoding"] == "sparse float32" and records[0]["nonzero"] == 4
    x = _rng(5).standard_normal((1, COLS)).astype(np.float32)
    assert np.array_equal(session(small).run(None, {"x": x})[0], x @ flat.reshape(ROWS, COLS).T)


def test_a_chain_that_does_not_rebuild_its_weight_exactly_is_not_used():
    weight = _grid4()
    real = onnx_storage.grid_codes

    def off_by_a_little(w):   # one scale a few ulps off: the decoded weight differs in its last bits
        codes, scales = real(w)
        return codes, scales * np.float32(1 + 1e-6)

    with mock.patch.object(onnx_storage, "grid_codes", off_by_a_little), \
            mock.patch.object(onnx_storage, "table_codes", return_value=None):   # and no table either
        small, records = compacted(gemm_model(weight, qdq=False))
    assert records == [] and [t.name for t in small.graph.initializer] == ["w"]


def test_an_exported_pruned_4bit_model_is_small_counts_its_weights_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(196, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight
            w[w.abs() < w.abs().flatten().quantile(0.8)] = 0.0   # 80 % pruned
    model = deepshrink.quantize(model, WeightOnly(bits=4), data=None)
    x = torch.randn(8, 196, generator=torch.Generator().manual_seed(1))
    small = export(model, tmp_path / "small.onnx", example_input=x)
    with mock.patch("deepshrink.deploy.lowering.compact_initializers", return_value=[]):
        plain = export(model, tmp_path / "plain.onnx", example_input=x)
    side = json.loads((tmp_path / "small.onnx.json").read_text())
    assert [(w["shape"], w["encoding"]) for w in side["stored_weights"]] == [([64, 196], "grid + sparse 4-bit"),
                                                                             ([10, 64], "grid + sparse 4-bit")]
    assert small.parity_passed and plain.parity_passed
    assert small.file_bytes < 0.2 * plain.file_bytes, (small.file_bytes, plain.file_bytes)
    assert storage_records(onnx.load(str(tmp_path / "small.onnx"))) and not storage_records(onnx.load(str(tmp_path / "plain.onnx")))
    # the counts read the weights the file decodes to, not its pieces
    assert onnx_parameter_counts(tmp_path / "small.onnx") == onnx_parameter_counts(tmp_path / "plain.onnx") == parameter_counts(model)
    feed = {session(onnx.load(str(tmp_path / "plain.onnx"))).get_inputs()[0].name: x.numpy()}
    outputs = [session(onnx.load(str(tmp_path / name))).run(None, feed)[0] for name in ("small.onnx", "plain.onnx")]
    assert np.array_equal(*outputs)
