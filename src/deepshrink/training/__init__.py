"""Training and fine-tuning loops (respecting pruning masks), with optional distillation."""
from deepshrink.training.config import Distillation, TrainConfig
from deepshrink.training.loop import History, accuracy, fit

__all__ = ["TrainConfig", "Distillation", "History", "fit", "accuracy"]
