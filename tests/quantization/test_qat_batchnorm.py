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
