"""What a transform needs from training, defined below both sides so neither imports the other.

Pruning and quantization never import ``deepshrink.training``: a transform that trains
(schedules, variational dropout, QAT, codebook fine-tuning, channel-pruning steps) or measures
(the budget loop, sensitivity sweeps) is handed the loop. It says *how* to train in one nested
``train: TrainConfig`` field of its config, and is given *what* trains as a callable:

- ``train_fn(model, data, config, *, teacher=..., penalty=...)`` trains ``model`` in place on
  ``data.train`` as ``config`` says (a loop of your own may read what it needs and ignore the
  rest). ``teacher`` (distillation) and ``penalty`` (a loss term, e.g. variational dropout's KL)
  are passed only when the transform has one, so ``def my_loop(model, data, config)`` serves every
  transform that needs neither. Its return value is kept in reports when it is a ``History``.
- ``accuracy_fn(model, loader, *, reference=None) -> float``: top-1 in [0, 1] over ``loader``
  (``reference``: the model to agree with when the data has no labels).

``deepshrink.training.fit`` / ``accuracy`` are the default ones: the top-level ``deepshrink.prune``
/ ``deepshrink.quantize`` and the pipeline pass them; ``deepshrink.pruning.prune`` and
``deepshrink.quantization.quantize`` require them only for the configs that train.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

from deepshrink.core.config import check
from deepshrink.core.errors import ConfigError


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from a teacher (the dense model): Hinton et al. 2015.

    ``loss``: how the student's first output is compared with the teacher's. ``kl``: KL divergence
    of the softened scores (``temperature``; for classifiers). ``mse``: the squared error relative
    to the teacher's energy, ``sum((s - t)^2) / sum(t^2)`` per batch, i.e. 10^(-SQNR/10), for what
    is not a score: embeddings, hidden states, box regressions. ``auto`` (the default): ``kl`` when
    the teacher's output is rows of class scores (``core.outputs.output_kind``), else ``mse``.
    """

    temperature: float = 4.0
    alpha: float = 0.5  # weight of the soft-target loss; 1 - alpha weighs the label loss
    loss: Literal["auto", "kl", "mse"] = "auto"

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"{self.temperature} must be > 0")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"{self.alpha} is outside [0, 1]")
        check(self.loss in ("auto", "kl", "mse"), "loss", f"{self.loss!r} is not one of auto, kl, mse")


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
    # augmentation for image inputs (N, C, H, W): each training sample moved by a random whole number
    # of pixels in [-random_shift, random_shift] along H and W, edges replicated; the teacher sees the
    # same moved batch. 0 = off. Validation never moves.
    random_shift: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "epochs", f"{self.epochs} must be >= 0")
        check(self.lr > 0, "lr", f"{self.lr} must be > 0")
        check(0.0 <= self.momentum < 1.0, "momentum", f"{self.momentum} is outside [0, 1); SGD's usual is 0.9")
        check(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be >= 0, e.g. 0.0001 (0 = off)")
        check(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
        check(self.early_stopping_patience >= 0, "early_stopping_patience", f"{self.early_stopping_patience} must be >= 0")
        check(self.random_shift >= 0, "random_shift", f"{self.random_shift} must be >= 0 pixels, e.g. 2 for 28x28 digits (0 = off)")


@dataclass
class History:
    """What ``deepshrink.training.fit`` returns (and a round of a schedule without epochs reports)."""

    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


class TrainFn(Protocol):
    def __call__(self, model: Any, data: Any, config: TrainConfig, /, **extras: Any) -> Any: ...


class AccuracyFn(Protocol):
    def __call__(self, model: Any, loader: Any, /, *, reference: Any = None) -> float: ...


def run_training(train_fn: TrainFn | None, model: Any, data: Any, config: TrainConfig, *, who: str,
                 teacher: Any = None, penalty: Callable[[float], Any] | None = None) -> Any:
    """``train_fn(model, data, config)`` with ``teacher`` / ``penalty`` passed only when given;
    a ``ConfigError`` naming ``who`` when there is no loop to call."""
    if train_fn is None:
        raise ConfigError(f"{who} trains: pass train_fn= (your loop, or deepshrink.training.fit), or call "
                          "deepshrink.prune / deepshrink.quantize, which use deepshrink.training.fit by default")
    extras: dict[str, Any] = {}
    if teacher is not None:
        extras["teacher"] = teacher
    if penalty is not None:
        extras["penalty"] = penalty
    return train_fn(model, data, config, **extras)


def require_accuracy(accuracy_fn: AccuracyFn | None, *, who: str) -> AccuracyFn:
    if accuracy_fn is None:
        raise ConfigError(f"{who} measures accuracy: pass accuracy_fn= (yours, or deepshrink.training.accuracy), or "
                          "call deepshrink.prune / deepshrink.quantize, which use deepshrink.training.accuracy by default")
    return accuracy_fn


__all__ = ["TrainConfig", "Distillation", "History", "TrainFn", "AccuracyFn", "run_training", "require_accuracy"]
