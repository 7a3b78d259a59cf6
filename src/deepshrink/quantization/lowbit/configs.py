"""Low-bit weight-only configs: one frozen dataclass per scheme, dispatched by type.

Every config selects Conv/Linear layers the same way: ``layers`` maps a module name, a
``re:`` regex or ``*`` to a width in bits (or ``None`` to leave that layer in float); the first
pattern that matches a layer wins (dict order) and layers no pattern matches get ``bits``.
``{"re:.*fc2": 8, "*": 4}`` puts fc2 at 8 bits and everything else at 4; ``{"conv1": None}``
keeps conv1 in float. A pattern that matches no layer is an error. Activations stay float,
except in ``Int8DynamicLowBit``, whose weights the ``.pte`` itself stores and runs at low bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from deepshrink.core.config import check
from deepshrink.core.loops import TrainConfig

MIN_BITS, MAX_BITS = 2, 8
RUNTIME_WIDTHS = (4, 8)    # XNNPACK's low-bit GEMMs with int8 activations: qd8-f32-qb4w and qd8-f32-qc8w
RUNTIME_GROUP_MULTIPLE = 32   # XNNPACK's qb4w kernels take groups of a multiple of 32 weights
Granularity = Literal["per_tensor", "per_channel", "per_group"]


def _check_width(bits: object, key: str) -> None:
    check(isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS, key,
          f"{bits!r} is outside {MIN_BITS}..{MAX_BITS}; use e.g. 4 for int4 or 8 for int8 weights")


def _check_layers(layers: dict[str, int | None]) -> None:
    for pattern, bits in layers.items():
        if bits is not None:
            _check_width(bits, f"layers.{pattern}")


@dataclass(frozen=True)
class UniformWeights:
    """Where and how to put weights on a uniform grid; shared by ``WeightOnly`` and ``WeightQAT``.

    ``symmetric``: signed codes, zero point 0 (``scale = max|w| / qmax``); otherwise unsigned
    codes with a zero point, the range always containing 0 so pruned zeros stay exact.
    ``granularity``: one scale per tensor, per output channel, or per ``group_size``
    consecutive weights of an output channel's flattened row (``[out, in*kh*kw]``).
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    layers: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_width(self.bits, "bits")
        _check_layers(self.layers)
        if self.granularity == "per_group":
            check(isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 1,
                  "group_size", f"{self.group_size!r} must be a positive integer with granularity per_group, e.g. 32")
        else:
            check(self.group_size is None, "group_size",
                  f"{self.group_size} is only used with granularity per_group; set granularity: per_group or drop it")


@dataclass(frozen=True)
class WeightOnly(UniformWeights):
    """Post-training uniform quantization of weights (no data needed); activations stay float."""


@dataclass(frozen=True)
class WeightQAT(UniformWeights):
    """Quantization-aware training of low-bit weights, then weights snapped onto the grid.

    ``method``: ``"ste"`` fake-quantizes with min/max scales recomputed each step and passes
    gradients straight through; ``"lsq"`` learns one step size per channel (or tensor) as
    well (Esser et al. 2020; symmetric, per_tensor or per_channel only). ``train``: the
    training, run by ``quantize``'s ``train_fn`` (``core.loops``; ``deepshrink.quantize`` passes
    ``deepshrink.training.fit``: Adam, cosine decay, the best validation epoch kept);
    ``train.distill`` distils from the float model as teacher.
    """

    method: Literal["ste", "lsq"] = "lsq"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=1e-4))

    MOVED_KEYS: ClassVar[dict[str, str]] = {k: f"train.{k}" for k in ("epochs", "lr", "batch_size", "distill", "seed")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "lsq":
            check(self.symmetric, "symmetric",
                  "false is not supported by method lsq, which learns a scale but no zero point; use method ste")
            check(self.granularity != "per_group", "granularity",
                  "per_group is not supported by method lsq (one learned step per tensor or channel); use method ste")


@dataclass(frozen=True)
class Codebook:
    """Non-uniform weights: each layer's weights share ``2^bits`` levels (one codebook per layer).

    ``method``: ``"kmeans"`` (Deep Compression's weight sharing; ``kmeans_init`` linear or
    density), ``"equal_population"`` (levels at the means of equally full bins), or
    ``"power_of_two"`` (0 and +-2^k: ``2^bits - 1`` levels, multiplication becomes a shift).
    Pruned weights (attached masks, else exact zeros) are left out of the fit and stay zero.
    ``train`` (None: no fine-tuning) then trains the levels by the summed gradients of their
    members (and the float parameters: biases, unquantized layers), run by ``quantize``'s
    ``train_fn`` (``core.loops``); not allowed for ``power_of_two``, whose levels would leave the
    powers of two.

    ``grid``: ``"float"`` keeps the levels as fitted. ``"int8"`` snaps them, per output channel
    ``c``, onto that channel's symmetric int8 grid: ``scale_c = max|w_c| / 127`` of the weights
    before quantizing (the per-channel scale of ``Int8DynamicLowBit(bits=8)``), level ``j`` becomes
    ``clamp(round(codebook[j] / scale_c), -127, 127) * scale_c``. The indices stay shared by the
    layer, so each channel has at most ``2^bits`` values, all integer multiples of its scale. The
    ``.dsk`` stores the float levels (the same record as ``"float"``) plus one float32 scale per
    channel; the integer codes follow from them. ``Int8DynamicLowBit`` (8-bit layers) then takes
    these codes and scales as they are, so the ``.pte`` and ``.onnx`` hold exactly the numbers of
    the ``.dsk``. With ``train``, the optimizer moves the float levels while the layer computes
    with their snapped values (straight-through: a level's gradient is its members' summed
    gradients, but none from channels where it is clipped at +-127), so the weights stay on the
    grid at every step; the scales do not train. Not allowed for ``power_of_two``, whose levels
    would leave the powers of two.

    ``tables``: ``"float16"`` rounds each quantized layer's levels and its bias to the nearest
    float16 values once fitting and fine-tuning are done; the layers compute with the rounded
    values (still float32 tensors), and the ``.dsk`` stores them in 2 bytes each instead of 4
    (``formats.records`` stores any stream whose values are all float16 as float16). With
    ``grid="int8"`` the levels are rounded before they are snapped; the per-channel scales stay
    float32. ``"float32"`` keeps them as trained.
    """

    method: Literal["kmeans", "equal_population", "power_of_two"] = "kmeans"
    bits: int = 4
    layers: dict[str, int | None] = field(default_factory=dict)
    kmeans_init: Literal["linear", "density"] = "linear"
    kmeans_iters: int = 100
    train: TrainConfig | None = None
    grid: Literal["float", "int8"] = "float"
    tables: Literal["float32", "float16"] = "float32"

    MOVED_KEYS: ClassVar[dict[str, str]] = {"finetune_epochs": "train.epochs", "finetune_lr": "train.lr",
                                            "batch_size": "train.batch_size", "seed": "train.seed"}

    @property
    def finetunes(self) -> bool:
        return self.train is not None and self.train.epochs > 0

    def __post_init__(self) -> None:
        _check_width(self.bits, "bits")
        _check_layers(self.layers)
        check(isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 0, "kmeans_iters",
              f"{self.kmeans_iters!r} must be an integer >= 0, e.g. 100")
        check(not (self.method == "power_of_two" and self.finetunes), "train",
              "fine-tuning with method power_of_two would move its levels off the powers of two; "
              "use method kmeans to fine-tune, or leave train out")
        check(self.grid in ("float", "int8"), "grid", f"{self.grid!r} is not allowed; choose 'float' or 'int8'")
        check(self.tables in ("float32", "float16"), "tables", f"{self.tables!r} is not allowed; choose 'float32' or 'float16'")
        check(not (self.method == "power_of_two" and self.grid == "int8"), "grid",
              "int8 would move power_of_two's levels off the powers of two; use method kmeans with grid int8, "
              "or grid float")


def _check_runtime_width(bits: object, key: str) -> None:
    check(isinstance(bits, int) and not isinstance(bits, bool) and bits in RUNTIME_WIDTHS, key,
          f"{bits!r} has no low-bit kernel in the runtime (XNNPACK runs 4-bit groupwise and 8-bit per-channel "
          "weights); use 4 or 8, None for float, or WeightOnly for other widths (stored only in .dsk)")


@dataclass(frozen=True)
class Int8DynamicLowBit:
    """Linear weights the ``.pte`` stores and runs at low bits: 4-bit groupwise or 8-bit per channel,
    with int8 activations quantized per row at run time (XNNPACK's qd8-f32-qb4w / qd8-f32-qc8w GEMMs,
    the scheme of torchao's ``Int8DynamicActivationIntxWeightConfig``).

    ``bits``: 4 or 8, the width of layers no ``layers`` pattern matches; ``layers`` maps names or
    patterns to 4, 8 or None (float), as in the module doc, but selects Linear layers only: Conv
    layers stay float (XNNPACK has no low-bit convolution with dynamic activations).
    ``group_size``: one scale per this many consecutive input weights of a 4-bit layer (a multiple
    of 32, XNNPACK's constraint); ``None``: one scale per output channel. 8-bit layers are always
    per channel (XNNPACK has no groupwise 8-bit kernel). Weights are symmetric (zero point 0); the
    4-bit scales are rounded to bfloat16, the precision XNNPACK keeps of them. A layer whose input
    size is not a multiple of the group (or of 32) gets zero input columns appended (an exact pad:
    a zero changes neither the product nor the activation's range).

    ``quantize`` returns the model with those Linear layers replaced by ``DynamicQuantLinear``
    modules, which compute in eager PyTorch what the runtime computes (the per-row int8 rounding of
    the activations included), so the export parity check compares like with like.
    """

    bits: int = 4
    group_size: int | None = 32
    layers: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_runtime_width(self.bits, "bits")
        for pattern, bits in self.layers.items():
            if bits is not None:
                _check_runtime_width(bits, f"layers.{pattern}")
        if self.group_size is not None:
            check(isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 1
                  and self.group_size % RUNTIME_GROUP_MULTIPLE == 0, "group_size",
                  f"{self.group_size!r} must be a positive multiple of {RUNTIME_GROUP_MULTIPLE} (XNNPACK's 4-bit groupwise "
                  "kernels), e.g. 32 or 128; or None for one scale per output channel")


__all__ = ["MIN_BITS", "MAX_BITS", "RUNTIME_WIDTHS", "UniformWeights", "WeightOnly", "WeightQAT", "Codebook",
           "Int8DynamicLowBit"]
