"""The ``quantize`` verb: one entry point for every scheme, chosen by the config's type.

It returns the model to use from then on — always keep the return value: the int8 schemes
(``Int8Static``, ``Int8Dynamic``, ``Int8QAT``, ``Int8WithinBudget``) return a new quantized graph
and leave the argument as it was; the weight-only schemes (``WeightOnly``, ``WeightQAT``,
``Codebook``) change the eager module in place and return it. Dropping the return value is the
bug in the seed example this project answers.

What a scheme did (calibrated ranges, equalization, bias shifts, the budget search) is recorded on
the result as plain data (``export`` copies it into the sidecar) and read back with
``quantize_report(model)`` (``activation_ranges(model)`` for the ranges alone).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from deepshrink.core.config import to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import AccuracyFn, TrainFn
from deepshrink.core.masks import has_masks
from deepshrink.core.registry import Registry
from deepshrink.core.targets import TargetProfile, get_target
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.configs import Int8Dynamic, Int8QAT, Int8Static, Int8WithinBudget

_RECORD = "_deepshrink_quant"


@dataclass(frozen=True)
class QuantizeCall:
    """What a quantization handler gets besides the model and its config (``quantize``'s keywords)."""

    data: DataSplits | None
    target: TargetProfile
    train_fn: TrainFn | None = None
    accuracy_fn: AccuracyFn | None = None


# config type -> handler(model, config, call) -> quantized model; the names are the recipe's ``scheme:``
QUANTIZERS: Registry[Callable[[nn.Module, Any, QuantizeCall], nn.Module]] = Registry("quantize")


def quantize(model: nn.Module, config: object, *, data: DataSplits | None, target: TargetProfile | str = "xnnpack",
             dynamic: dict | None = None, train_fn: TrainFn | None = None, accuracy_fn: AccuracyFn | None = None) -> nn.Module:
    """``model`` quantized as ``config`` says; use the returned model (see the module doc).

    ``data``: calibration and training splits (``None`` for the schemes that need none:
    ``WeightOnly``, ``Codebook`` without fine-tuning). ``target``: the runtime profile.
    ``dynamic``: the dimensions that vary besides the batch (``core.graph``); default
    ``data.dynamic``, inferred from samples of varying shapes. The graph is captured with them, so
    its exports take every size in range. ``train_fn`` / ``accuracy_fn``: the training loop and
    the accuracy measure for the schemes that train (``Int8QAT``, ``WeightQAT``, ``Codebook`` with
    ``train``) or measure (``Int8WithinBudget``); see ``core.loops``. ``deepshrink.quantize`` passes
    ``deepshrink.training.fit`` / ``accuracy``.
    """
    profile = get_target(target) if isinstance(target, str) else target
    if dynamic is not None:
        if data is None:
            raise ConfigError("quantize: dynamic= describes the data's varying dimensions; pass data= with it")
        data = dataclasses.replace(data, dynamic=dynamic)
    if has_masks(model):
        raise ConfigError("quantize: the model still carries pruning masks; call deepshrink.finalize(model) first")
    call = QuantizeCall(data=data, target=profile, train_fn=train_fn, accuracy_fn=accuracy_fn)
    quantized = QUANTIZERS.handler_for(config)(model, config, call)
    details = dict(getattr(quantized, _RECORD, None) or {})
    record = {"scheme": type(config).__name__, "config": to_dict(config), **details}
    if data is not None and data.dynamic:
        record["dynamic"] = {str(k): {str(d): list(r) for d, r in dims.items()} for k, dims in data.dynamic.items()}
    object.__setattr__(quantized, _RECORD, record)
    return quantized


def quantize_report(model: nn.Module) -> dict:
    """What ``quantize`` did to ``model`` (plain data): ``scheme``, ``config`` and each scheme's
    details — ``activation_ranges``, ``budget`` (the ``Int8WithinBudget`` search), ``weights``..."""
    info = getattr(model, _RECORD, None)
    if not info:
        raise ConfigError(f"quantize_report: {type(model).__name__} was not quantized by deepshrink.quantize")
    return copy.deepcopy(info)


def activation_ranges(model: nn.Module) -> list[dict]:
    """Per activation quantizer of a statically quantized model: ``{node, layer, method,
    observed_min, observed_max, clip_min, clip_max, min, max, scale, zero_point}``."""
    info = getattr(model, _RECORD, None)
    if not info:
        raise ConfigError(f"activation_ranges: {type(model).__name__} was not quantized by deepshrink.quantize")
    return list(info.get("activation_ranges", []))


@QUANTIZERS.register(Int8Static, name="int8-static")
def _int8_static(model, config: Int8Static, call: QuantizeCall):
    from deepshrink.quantization.pt2e import quantize_static

    return quantize_static(model, config, call.data, call.target)


@QUANTIZERS.register(Int8Dynamic, name="int8-dynamic")
def _int8_dynamic(model, config: Int8Dynamic, call: QuantizeCall):
    from deepshrink.quantization.pt2e import quantize_dynamic

    return quantize_dynamic(model, config, call.data, call.target)


@QUANTIZERS.register(Int8QAT, name="int8-qat")
def _int8_qat(model, config: Int8QAT, call: QuantizeCall):
    from deepshrink.quantization.qat import finalize_qat, train_qat

    return finalize_qat(train_qat(model, config, call.data, call.target, train_fn=call.train_fn))


@QUANTIZERS.register(Int8WithinBudget, name="int8-budget")
def _int8_within_budget(model, config: Int8WithinBudget, call: QuantizeCall):
    from deepshrink.quantization.budget import search_within_budget

    quantized, report = search_within_budget(
        model, call.data, max_drop_pt=config.max_drop_pt, target=call.target, ptq=config.ptq, qat=config.qat,
        max_fp32_layers=config.max_fp32_layers, train_fn=call.train_fn, accuracy_fn=call.accuracy_fn,
    )
    details = dict(getattr(quantized, _RECORD, None) or {})
    object.__setattr__(quantized, _RECORD, {**details, "budget": report.as_dict(), "budget_steps": report.lines()})
    return quantized
