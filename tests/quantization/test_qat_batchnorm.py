"""Int8QAT with live batch norm (folded QAT-style, then into the int8 conv at conversion).

The slowest file here (~25 s on 2 shared cores): torchao traces each conv-bn pattern variant
with torch.export while preparing and converting, whatever the model's size.
"""
from __future__ import annotations

import torch

from deepshrink.core.targets import get_target
from deepshrink.quantization import Int8QAT
from deepshrink.quantization.qat import finalize_qat, train_qat
from deepshrink.training import TrainConfig, fit

from .conftest import make_mobile
from .test_qat import runtime_steps_off


def test_batchnorm_qat_exports_and_matches_the_fake_quantized_model(mobile, mobile_data, tmp_path):
    fake_quant = train_qat(mobile, Int8QAT(train=TrainConfig(epochs=1, lr=1e-3, batch_size=32)), mobile_data,
                           get_target("xnnpack"), train_fn=fit)
    converted = finalize_qat(fake_quant)
    assert not [n for n in converted.graph.nodes if "batch_norm" in str(n.target)]   # folded
    x = torch.stack([mobile_data.test[i][0] for i in range(len(mobile_data.test))])
    steps, agreement = runtime_steps_off(fake_quant, converted, tmp_path / "qat.pte", x)
    # the fake-quantized graph rescales the conv output by the batch-norm factor in float; the int8
    # kernel has it folded into the weights: at most two output codes apart, and rarely
    assert float(steps.max()) <= 2.001 and float(steps.mean()) <= 0.15 and agreement >= 0.99
    torch.testing.assert_close(mobile(x[:4]), make_mobile()(x[:4]), rtol=0, atol=0)   # the float model is untouched


def test_a_conv1d_batchnorm_pair_folds_too(tmp_path):
    """Frames through Conv1d-BN1d (a speech front end): folded like Conv2d-BN2d, and no batch count is left
    counting in the graph (torchao drops it for BatchNorm2d only)."""
    from torch import nn

    from .conftest import labelled_by

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.2, 5)
    data = labelled_by(model, n=128, shape=(4, 12))
    fake_quant = train_qat(model, Int8QAT(train=TrainConfig(epochs=1, lr=1e-3, batch_size=32)), data,
                           get_target("xnnpack"), train_fn=fit)
    converted = finalize_qat(fake_quant)
    assert not [n for n in converted.graph.nodes if "batch_norm" in str(n.target) or "add_" in str(n.target)]
    assert any("conv1d" in str(n.target) for n in converted.graph.nodes)
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    with torch.no_grad():
        folded, simulated = converted(x), fake_quant(x)
    # the folded int8 weights against batch norm applied in float to the fake-quantized conv: codes apart, rarely
    assert float((folded.argmax(1) == simulated.argmax(1)).float().mean()) >= 0.95
    assert float((folded - simulated).abs().max()) < 0.25 * float(simulated.abs().max())


def test_torchaos_conv_bn_rewrites_are_narrowed_only_while_they_run():
    from torch import nn
    from torchao.quantization.pt2e import qat_utils

    from deepshrink.quantization.qat import _conv_bn_rewrites_for_kinds_present

    names = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    before = [getattr(qat_utils, n) for n in names]
    graph = torch.export.export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train(), (torch.randn(2, 1, 5, 5),)).module()
    try:
        with _conv_bn_rewrites_for_kinds_present(graph):
            narrowed = [getattr(qat_utils, n) for n in names]
            assert all(a is not b for a, b in zip(narrowed, before))
            dummy = object()
            assert narrowed[0](dummy, torch.nn.functional.conv1d, (), False) is dummy   # absent kind: untouched
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert [getattr(qat_utils, n) for n in names] == before
