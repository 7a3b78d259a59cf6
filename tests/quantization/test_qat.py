"""Int8QAT: the converted model exports to both runtimes and reproduces the fake-quantized model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.core.targets import get_target
from deepshrink.quantization import Int8QAT, activation_ranges, quantize
from deepshrink.quantization.qat import finalize_qat, train_qat
from deepshrink.training import TrainConfig, fit

from .conftest import labelled_by


def make_depthwise(seed: int = 0) -> nn.Module:
    """conv-ReLU6, depthwise conv-ReLU6, linear: no batch norm (see test_qat_batchnorm.py for that)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU6(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    ).eval()


_TRAINED: dict = {}


def trained(target: str):
    """QAT for ``target``: its int8 layout (XNNPACK's s8s8, ONNX Runtime's u8s8-reduced) is trained in."""
    if target not in _TRAINED:
        model = make_depthwise()
        data = labelled_by(model, n=256, shape=(1, 8, 8))
        fake_quant = train_qat(model, Int8QAT(train=TrainConfig(epochs=2, lr=1e-3, batch_size=32)), data, get_target(target),
                               train_fn=fit)
        _TRAINED[target] = model, data, fake_quant, finalize_qat(fake_quant)
    return _TRAINED[target]


@pytest.fixture(scope="module")
def setup():
    return trained("xnnpack")


def runtime_steps_off(fake_quant, converted, path, x):
    """|runtime - fake-quantized| in units of the output quantization step."""
    from deepshrink.deploy import export
    from deepshrink.evaluation.runners import open_runner

    export(converted, path, example_input=x[:16])
    produced = open_runner(path).predict(x)
    with torch.no_grad():
        expected = fake_quant(x)
    agreement = float((produced.argmax(1) == expected.argmax(1)).float().mean())
    return (produced - expected).abs() / activation_ranges(converted)[-1]["scale"], agreement


@pytest.mark.parametrize("suffix,target", [(".pte", "xnnpack"), (".onnx", "onnxruntime")])
def test_runtime_output_matches_the_fake_quantized_model(tmp_path, suffix, target):
    # holds on any x86 CPU: the onnxruntime layout has 7-bit weights, so no pair sum can leave int16
    _, data, fake_quant, converted = trained(target)
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    steps, agreement = runtime_steps_off(fake_quant, converted, tmp_path / f"qat{suffix}", x)
    # the integer kernels round the bias and the requantization where fake quantization stays in float:
    # at most one output code apart, and rarely
    assert float(steps.max()) <= 1.001 and float(steps.mean()) <= 0.05 and agreement >= 0.99


def test_training_moves_the_copy_not_the_float_model(setup):
    model, data, fake_quant, _ = setup
    x = data.example_input(4)
    torch.testing.assert_close(model(x), make_depthwise()(x), rtol=0, atol=0)
    assert 0.75 <= fake_quant._deepshrink_quant["qat_val_accuracy"][-1] <= 1.0


def test_the_qat_scheme_runs_through_quantize():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    data = labelled_by(model, n=128, shape=(1, 8, 8))
    q = quantize(model, Int8QAT(train=TrainConfig(epochs=1, lr=1e-4, batch_size=32)), data=data, train_fn=fit)
    info = q._deepshrink_quant
    assert info["scheme"] == "Int8QAT" and len(info["qat_val_accuracy"]) == 1 and info["qat_val_accuracy"][0] >= 0.9
    assert [r["layer"] for r in activation_ranges(q)] == ["input", "1", "3"]   # input, after the ReLU6, logits


def _training_args(graph):
    return {str(n.target): n.args[-1] if "dropout" in str(n.target) else n.args[5]
            for n in graph.graph.nodes if "dropout" in str(n.target) or "batch_norm" in str(n.target)}


def test_train_and_eval_switch_dropout_and_batch_norm_and_skip_what_is_absent(monkeypatch):
    from torchao.quantization.pt2e import export_utils

    from deepshrink.quantization.qat import allow_train_eval

    torch.manual_seed(0)
    both = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(144, 3))
    x = torch.randn(2, 1, 8, 8)
    graph = allow_train_eval(torch.export.export(both.train(), (x,)).module())
    graph.eval()
    assert _training_args(graph) == {"aten.batch_norm.default": False, "aten.dropout.default": False}
    assert torch.equal(graph(x), graph(x))                           # no dropout, running statistics
    graph.train()
    assert _training_args(graph) == {"aten.batch_norm.default": True, "aten.dropout.default": True}
    assert not torch.equal(graph(x), graph(x))                       # dropout live again
    # a graph without dropout or batch norm: neither pattern is traced (each trace is a small export)
    plain = allow_train_eval(torch.export.export(make_depthwise().train(), (x,)).module())

    def refused(*args, **kwargs):
        raise AssertionError("a pattern rewrite ran on a graph without its op")

    monkeypatch.setattr(export_utils, "_replace_dropout", refused)
    monkeypatch.setattr(export_utils, "_replace_batchnorm", refused)
    plain.eval()
    plain.train()
    assert _training_args(plain) == {}
