"""Quantization: ``quantize(model, Int8Static(...), data=...)`` returns the quantized model."""
from deepshrink.quantization.api import quantize
from deepshrink.quantization.configs import Int8Dynamic, Int8Static

__all__ = ["quantize", "Int8Static", "Int8Dynamic"]
