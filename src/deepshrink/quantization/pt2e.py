"""PT2E quantization (torchao) with ExecuTorch's XNNPACK quantizer, driven by the target profile."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deepshrink.core.graph import capture
from deepshrink.core.targets import TargetProfile
from deepshrink.data.splits import DataSplits


def xnnpack_quantizer(*, per_channel: bool, dynamic: bool, calibration: str = "histogram"):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e import MinMaxObserver

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic)
    if calibration == "minmax" and not dynamic:
        act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    return XNNPACKQuantizer().set_global(config)


@torch.no_grad()
def calibrate(prepared: nn.Module, data: DataSplits, samples: int, batch_size: int = 64) -> int:
    seen = 0
    for x, _ in data.loader("calib", batch_size=batch_size):
        take = min(len(x), samples - seen)
        prepared(x[:take])
        seen += take
        if seen >= samples:
            break
    return seen


def quantize_pt2e(
    model: nn.Module,
    data: DataSplits,
    target: TargetProfile,
    *,
    per_channel: bool | None,
    dynamic: bool,
    calibration: str = "histogram",
    calibration_samples: int = 0,
) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    per_channel = target.quantizer.per_channel_weights if per_channel is None else per_channel
    graph = capture(model, data.example_input(), max_batch=target.max_batch).module()
    prepared = prepare_pt2e(graph, xnnpack_quantizer(per_channel=per_channel, dynamic=dynamic, calibration=calibration))
    if not dynamic:
        calibrate(prepared, data, calibration_samples)
    return convert_pt2e(prepared)
