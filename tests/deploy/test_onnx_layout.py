"""Signed int8 activations rewritten as uint8 in the .onnx: the same outputs bit for bit, weights still signed."""
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import deepshrink as ds
import deepshrink.deploy.lowering as lowering
from deepshrink.deploy import export


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
                         nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


def _zero_point_types(path) -> dict[str, set[int]]:
    proto = onnx.load(path)
    inits = {i.name: i.data_type for i in proto.graph.initializer}
    found: dict[str, set[int]] = {"QuantizeLinear": set(), "DequantizeLinear": set()}
    for node in proto.graph.node:
        if node.op_type in found and len(node.input) > 2:
            found[node.op_type].add(inits[node.input[2]])
    return found


def _run(path, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_s8_activations_become_u8_with_identical_outputs(tmp_path, monkeypatch):
    model = _net()
    samples = [torch.rand(3, 8, 8) for _ in range(48)]
    data = ds.data.from_samples(calib=samples, eval=samples)
    quantized = ds.quantize(model, ds.Int8Static(int8_layout="s8s8-reduced"), data=data, target="xnnpack")
    x = torch.stack(samples[:16])
    rewritten = export(quantized, tmp_path / "u8.onnx", example_input=x[:4], target="onnxruntime")
    assert rewritten.parity_passed
    monkeypatch.setattr(lowering, "unsigned_activations", lambda model: 0)
    export(quantized, tmp_path / "s8.onnx", example_input=x[:4], target="onnxruntime")

    u8, s8 = _zero_point_types(tmp_path / "u8.onnx"), _zero_point_types(tmp_path / "s8.onnx")
    INT8, UINT8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8
    assert s8["QuantizeLinear"] == {INT8}
    assert u8["QuantizeLinear"] == {UINT8}                    # every activation quantizer
    assert u8["DequantizeLinear"] == {INT8, UINT8}            # weights stay int8, activations uint8
    assert np.array_equal(_run(tmp_path / "u8.onnx", x), _run(tmp_path / "s8.onnx", x))   # exact, not close
