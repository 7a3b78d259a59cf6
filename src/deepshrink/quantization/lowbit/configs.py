"""Low-bit weight-only configs: one frozen dataclass per scheme, dispatched by type.

Every config selects Conv/Linear layers the same way: ``layers`` maps a module name, a
``re:`` regex or ``*`` to a width in bits (or ``None`` to leave that layer in float); the first
pattern that matches a layer wins (dict order) and layers no pattern matches get ``bits``.
``{"re:.*fc2": 8, "*": 4}`` puts fc2 at 8 bits and everything else at 4; ``{"conv1": None}``
keeps conv1 in float. A pattern that matches no layer is an error. Activations stay float.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from deepshrink.core.config import check
from deepshrink.core.loops import TrainConfig

MIN_BITS, MAX_BITS = 2, 8
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
    """

    method: Literal["kmeans", "equal_population", "power_of_two"] = "kmeans"
    bits: int = 4
    layers: dict[str, int | None] = field(default_factory=dict)
    kmeans_init: Literal["linear", "density"] = "linear"
    kmeans_iters: int = 100
    train: TrainConfig | None = None

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


__all__ = ["MIN_BITS", "MAX_BITS", "UniformWeights", "WeightOnly", "WeightQAT", "Codebook"]
