"""Target profiles: what a device runtime wants. Every stage reads these instead of hard-coding.

A profile is plain data. ``xnnpack`` is ExecuTorch's CPU backend for phones; ``onnxruntime`` is
ONNX Runtime's CPU execution provider with a QDQ graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deepshrink.core.errors import ConfigError

# How int8 activations and weights are laid out, in ONNX Runtime's terms (activation, weight):
#   s8s8          int8 activations, int8 weights in [-127, 127]     XNNPACK's scheme
#   s8s8-reduced  int8 activations, 7-bit weights in [-63, 63]      ORT's ``reduce_range``
#   u8s8-reduced  uint8 activations, 7-bit weights in [-63, 63]
#   u8s8          uint8 activations, int8 weights in [-127, 127]
#   u8u8          uint8 activations, uint8 weights (zero point 128)
#   s8s8-guarded  int8 activations, int8 weights in [-127, 127] except the output channels whose
#   u8s8-guarded  pair sums came near int16 on the calibration samples: those in [-63, 63]
#                 (``quantization.weight_range``; the export emulates the kernel to check)
# On x86 without VNNI, ONNX Runtime's u8 x s8 kernels add two products into a saturating int16
# (``vpmaddubsw``): 255 * 127 * 2 = 64,770 > 32,767, so full-range int8 weights can overflow.
# With 7-bit weights a pair is at most 255 * 63 * 2 = 32,130, and u8 x u8 runs a widening kernel:
# those layouts cannot saturate on any CPU. ``bench/results/ort_int8.md`` measures the first five.
# The guarded layouts keep the 8th bit wherever the measured pair sums leave room for it.
Int8Layout = Literal["s8s8", "s8s8-reduced", "u8s8-reduced", "u8s8", "u8u8", "s8s8-guarded", "u8s8-guarded"]
INT8_LAYOUTS: tuple[str, ...] = ("s8s8", "s8s8-reduced", "u8s8-reduced", "u8s8", "u8u8", "s8s8-guarded", "u8s8-guarded")
SATURATION_SAFE_LAYOUTS: tuple[str, ...] = ("s8s8-reduced", "u8s8-reduced", "u8u8")
GUARDED_LAYOUTS: tuple[str, ...] = ("s8s8-guarded", "u8s8-guarded")
XNNPACK_LAYOUTS: tuple[str, ...] = ("s8s8", "s8s8-reduced", "s8s8-guarded")   # XNNPACK runs signed int8 only


def layout_ranges(layout: str) -> dict:
    """``{activation_dtype, weight_dtype, weight_qmin, weight_qmax}`` of an int8 layout (dtype names)."""
    if layout not in INT8_LAYOUTS:
        raise ConfigError(f"int8_layout: {layout!r} is not one of {', '.join(INT8_LAYOUTS)}")
    activation = "uint8" if layout.startswith("u8") else "int8"
    if layout == "u8u8":
        return {"activation_dtype": activation, "weight_dtype": "uint8", "weight_qmin": 0, "weight_qmax": 255}
    bound = 63 if layout.endswith("-reduced") else 127
    return {"activation_dtype": activation, "weight_dtype": "int8", "weight_qmin": -bound, "weight_qmax": bound}


@dataclass(frozen=True)
class QuantizerSettings:
    per_channel_weights: bool = True
    symmetric_weights: bool = True
    activation_bits: int = 8
    weight_bits: tuple[int, ...] = (8,)  # widths the runtime executes natively
    int8_layout: Int8Layout = "s8s8"     # see INT8_LAYOUTS


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
        # the file's CPU is unknown: full int8 weights only where x86 without VNNI cannot clip them
        # (measured per channel on the calibration samples), u8 activations for ORT's fast u8s8 kernels
        quantizer=QuantizerSettings(per_channel_weights=True, symmetric_weights=True, weight_bits=(8,),
                                    int8_layout="u8s8-guarded"),
        channel_multiple=8,
        description="ONNX QDQ graph run by ONNX Runtime's CPU execution provider",
    ),
}


def runtime_of(fmt: str) -> str:
    """The target profile whose runtime executes files of format ``fmt`` (``pte`` or ``onnx``)."""
    return next(name for name, profile in TARGETS.items() if profile.export_format == fmt)


def common_int8_layout(formats: tuple[str, ...] | list[str], target: "TargetProfile") -> str:
    """One int8 layout every runtime in ``formats`` executes correctly: the target's own when it
    serves them all; with a ``.pte`` among them, XNNPACK's signed layout made saturation-safe
    when ONNX Runtime must run the same weights too (7 bits only in the channels that need it)."""
    formats = tuple(formats) or (target.export_format,)
    if set(formats) <= {target.export_format}:
        return target.quantizer.int8_layout
    if "pte" in formats:
        return "s8s8-guarded" if "onnx" in formats else TARGETS["xnnpack"].quantizer.int8_layout
    return TARGETS[runtime_of(formats[0])].quantizer.int8_layout


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"target: unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None
