"""The ``quantize`` verb. Unlike pruning it returns a new module (a quantized graph): use the
return value — dropping it is the bug in the seed example this project answers.

What a scheme did (calibrated ranges, equalization, bias shifts) is recorded on the result
as ``model._deepshrink_quant`` (plain data; ``export`` copies it into the sidecar) and read
back with ``activation_ranges(model)``.
"""
from __future__ import annotations

from torch import nn

from deepshrink.core.config import to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.core.registry import Registry
from deepshrink.core.targets import TargetProfile, get_target
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.configs import Int8Dynamic, Int8QAT, Int8Static, Int8WithinBudget

_HANDLERS: Registry = Registry("quantize")


def quantize(model: nn.Module, config: object, *, data: DataSplits, target: TargetProfile | str = "xnnpack",
             dynamic: dict | None = None) -> nn.Module:
    """A quantized copy of ``model`` (the argument is not modified). ``dynamic``: the dimensions
    that vary besides the batch (``core.graph``); default ``data.dynamic``, inferred from samples
    of varying shapes. The graph is captured with them, so its exports take every size in range."""
    import dataclasses

    profile = get_target(target) if isinstance(target, str) else target
    if dynamic is not None:
        data = dataclasses.replace(data, dynamic=dynamic)
    if getattr(model, "_deepshrink_masks", None):
        raise ConfigError("quantize: the model still carries pruning masks; call deepshrink.pruning.finalize(model) first")
    quantized = _HANDLERS.handler_for(config)(model, config, data, profile)
    details = dict(getattr(quantized, "_deepshrink_quant", None) or {})
    record = {"scheme": type(config).__name__, "config": to_dict(config), **details}
    if data is not None and data.dynamic:
        record["dynamic"] = {str(k): {str(d): list(r) for d, r in dims.items()} for k, dims in data.dynamic.items()}
    object.__setattr__(quantized, "_deepshrink_quant", record)
    return quantized


def activation_ranges(model: nn.Module) -> list[dict]:
    """Per activation quantizer of a statically quantized model: ``{node, layer, method,
    observed_min, observed_max, clip_min, clip_max, min, max, scale, zero_point}``."""
    info = getattr(model, "_deepshrink_quant", None)
    if not info:
        raise ConfigError(f"activation_ranges: {type(model).__name__} was not quantized by deepshrink.quantize")
    return list(info.get("activation_ranges", []))


@_HANDLERS.register(Int8Static)
def _int8_static(model, config: Int8Static, data, target):
    from deepshrink.quantization.pt2e import quantize_static

    return quantize_static(model, config, data, target)


@_HANDLERS.register(Int8Dynamic)
def _int8_dynamic(model, config: Int8Dynamic, data, target):
    from deepshrink.quantization.pt2e import quantize_dynamic

    return quantize_dynamic(model, config, data, target)


@_HANDLERS.register(Int8QAT)
def _int8_qat(model, config: Int8QAT, data, target):
    from deepshrink.quantization.qat import finalize_qat, train_qat

    return finalize_qat(train_qat(model, config, data, target))


@_HANDLERS.register(Int8WithinBudget)
def _int8_within_budget(model, config: Int8WithinBudget, data, target):
    from deepshrink.quantization.budget import quantize_within_budget

    quantized, report = quantize_within_budget(
        model, data, max_drop_pt=config.max_drop_pt, target=target.name, ptq=config.ptq, qat=config.qat,
        max_fp32_layers=config.max_fp32_layers,
    )
    details = dict(getattr(quantized, "_deepshrink_quant", None) or {})
    object.__setattr__(quantized, "_deepshrink_quant", {**details, "budget": report.as_dict(), "budget_steps": report.lines()})
    return quantized
