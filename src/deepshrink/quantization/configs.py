"""Quantization configs: one frozen dataclass per scheme, dispatched by type."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deepshrink.core.config import check


@dataclass(frozen=True)
class Int8Static:
    """W8A8 post-training quantization: int8 weights, int8 activations calibrated on data.

    ``calibration``: how activation ranges are chosen from the calibration samples —
    ``histogram`` (minimise the L2 error of a histogram, XNNPACK's default) or ``minmax``.
    ``per_channel``: one weight scale per output channel; ``None`` takes the target's setting.
    """

    calibration: Literal["histogram", "minmax"] = "histogram"
    calibration_samples: int = 256
    per_channel: bool | None = None

    def __post_init__(self) -> None:
        check(self.calibration_samples >= 1, "calibration_samples", f"{self.calibration_samples} must be >= 1")


@dataclass(frozen=True)
class Int8Dynamic:
    """Int8 weights; activations quantized per batch at run time (no calibration needed)."""

    per_channel: bool | None = None
