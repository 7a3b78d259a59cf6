"""Training configs: plain frozen dataclasses (recipe keys are their fields).

They live in ``core.loops``, below pruning and quantization, whose configs nest them
(``train: TrainConfig``) without importing the training package; this is their home by name.
"""
from deepshrink.core.loops import Distillation, TrainConfig

__all__ = ["TrainConfig", "Distillation"]
