"""The ``quantize`` verb. Unlike pruning it returns a new module (a quantized graph): use the
return value — dropping it is the bug in the seed example this project answers."""
from __future__ import annotations

from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.registry import Registry
from deepshrink.core.targets import TargetProfile, get_target
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.configs import Int8Dynamic, Int8Static
from deepshrink.quantization.pt2e import quantize_pt2e

_HANDLERS: Registry = Registry("quantize")


def quantize(model: nn.Module, config: object, *, data: DataSplits, target: TargetProfile | str = "xnnpack") -> nn.Module:
    profile = get_target(target) if isinstance(target, str) else target
    if getattr(model, "_deepshrink_masks", None):
        raise ConfigError("quantize: the model still carries pruning masks; call deepshrink.pruning.finalize(model) first")
    quantized = _HANDLERS.handler_for(config)(model, config, data, profile)
    object.__setattr__(quantized, "_deepshrink_quant", {"scheme": type(config).__name__})
    return quantized


@_HANDLERS.register(Int8Static)
def _int8_static(model, config: Int8Static, data, target):
    return quantize_pt2e(
        model, data, target, per_channel=config.per_channel, dynamic=False,
        calibration=config.calibration, calibration_samples=config.calibration_samples,
    )


@_HANDLERS.register(Int8Dynamic)
def _int8_dynamic(model, config: Int8Dynamic, data, target):
    return quantize_pt2e(model, data, target, per_channel=config.per_channel, dynamic=True)
