"""Training configs: plain frozen dataclasses (recipe keys are their fields)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deepshrink.core.config import check


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from a teacher (the dense model): Hinton et al. 2015."""

    temperature: float = 4.0
    alpha: float = 0.5  # weight of the soft-target loss; 1 - alpha weighs the label loss

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"{self.temperature} must be > 0")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"{self.alpha} is outside [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    early_stopping_patience: int = 0  # epochs without val improvement before stopping; 0 = off
    keep_best: bool = True             # restore the weights of the best validation epoch
    distill: Distillation | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "epochs", f"{self.epochs} must be >= 0")
        check(self.lr > 0, "lr", f"{self.lr} must be > 0")
        check(0.0 <= self.momentum < 1.0, "momentum", f"{self.momentum} is outside [0, 1); SGD's usual is 0.9")
        check(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be >= 0, e.g. 0.0001 (0 = off)")
        check(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
        check(self.early_stopping_patience >= 0, "early_stopping_patience", f"{self.early_stopping_patience} must be >= 0")
