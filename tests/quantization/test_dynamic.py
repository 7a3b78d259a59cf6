"""Int8Dynamic reaches both runtimes: XNNPACK with per-channel weights, ONNX Runtime via our translations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.quantization import Int8Dynamic, quantize

from .conftest import labelled_by


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Mlp().eval()
    return model, labelled_by(model, n=128, shape=(1, 8, 8))


def test_weights_are_observed_before_conversion(setup):
    model, data = setup
    q = quantize(model, Int8Dynamic(), data=data)
    dq = [n for n in q.graph.nodes if n.target == torch.ops.quantized_decomposed.dequantize_per_channel.default]
    assert len(dq) == 2
    for node, layer in zip(dq, (model.fc1, model.fc2)):
        scale = getattr(q, node.args[1].target)
        torch.testing.assert_close(scale.float(), (layer.weight.abs().amax(1) / 127).clamp(min=2**-12), rtol=1e-6, atol=0)


def test_dynamic_model_exports_to_pte(setup, tmp_path):
    from deepshrink.deploy import export

    model, data = setup
    q = quantize(model, Int8Dynamic(), data=data)
    x = torch.stack([data.test[i][0] for i in range(32)])
    result = export(q, tmp_path / "dynamic.pte", example_input=x)
    # XNNPACK quantizes activations per row, the PyTorch graph per batch: close, not identical
    assert result.parity_argmax_agreement == 1.0 and result.parity_max_abs_diff < 0.02


def test_dynamic_model_exports_to_onnx_with_the_translations(setup, tmp_path):
    import onnxruntime as ort

    from deepshrink.core.graph import capture
    from deepshrink.quantization.onnx_ops import dynamic_quant_translations

    model, data = setup
    x = torch.stack([data.test[i][0] for i in range(32)])
    for per_channel in (True, False):
        q = quantize(model, Int8Dynamic(per_channel=per_channel), data=data, target="onnxruntime")
        program = torch.onnx.export(capture(q, x), dynamo=True, verbose=False, custom_translation_table=dynamic_quant_translations())
        program.save(str(tmp_path / "dynamic.onnx"))
        session = ort.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = q(x).numpy()
        assert np.abs(out - expected).max() < 1e-5


def test_per_tensor_dynamic_is_refused_for_xnnpack_with_the_alternative(setup):
    model, data = setup
    with pytest.raises(ConfigError, match=r"Int8Dynamic\.per_channel: False is not runnable on XNNPACK.*use per_channel=True"):
        quantize(model, Int8Dynamic(per_channel=False), data=data)
