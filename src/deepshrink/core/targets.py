"""Target profiles: what a device runtime wants. Every stage reads these instead of hard-coding.

A profile is plain data. ``xnnpack`` is ExecuTorch's CPU backend for phones; ``onnxruntime`` is
ONNX Runtime's CPU execution provider with a QDQ graph.
"""
from __future__ import annotations

from dataclasses import dataclass

from deepshrink.core.errors import ConfigError


@dataclass(frozen=True)
class QuantizerSettings:
    per_channel_weights: bool = True
    symmetric_weights: bool = True
    activation_bits: int = 8
    weight_bits: tuple[int, ...] = (8,)  # widths the runtime executes natively


@dataclass(frozen=True)
class TargetProfile:
    name: str
    export_format: str                 # the file the device runs: "pte" or "onnx"
    quantizer: QuantizerSettings
    channel_multiple: int              # structured pruning rounds kept channels to this
    max_batch: int = 1024              # upper bound of the dynamic batch dimension in exports
    description: str = ""


TARGETS: dict[str, TargetProfile] = {
    "xnnpack": TargetProfile(
        name="xnnpack",
        export_format="pte",
        quantizer=QuantizerSettings(per_channel_weights=True, symmetric_weights=True, weight_bits=(4, 8)),
        channel_multiple=8,
        description="ExecuTorch .pte lowered to the XNNPACK delegate (ARM/x86 CPUs)",
    ),
    "onnxruntime": TargetProfile(
        name="onnxruntime",
        export_format="onnx",
        quantizer=QuantizerSettings(per_channel_weights=True, symmetric_weights=True, weight_bits=(8,)),
        channel_multiple=8,
        description="ONNX QDQ graph run by ONNX Runtime's CPU execution provider",
    ),
}


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"target: unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None
