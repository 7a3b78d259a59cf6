"""Low-bit weight-only quantization: uniform 2..8-bit grids, codebooks, QAT, mixed precision.

``quantize(model, WeightOnly(bits=4), data=data)`` (or ``Codebook``, ``WeightQAT``) changes the
model in place and returns it; ``save_compressed`` writes the codes to a ``.dsk`` file and
``load_compressed`` rebuilds the eager module. ``Int8DynamicLowBit`` instead puts Linear weights at
4 or 8 bits that the ``.pte`` itself stores and runs (with int8 activations quantized at run time).
Importing this package registers the handlers.
"""
from deepshrink.quantization.lowbit import handlers as _handlers  # noqa: F401  (registers the configs)
from deepshrink.quantization.lowbit.codebook import codebook_quantize_, finetune_codebooks
from deepshrink.quantization.lowbit.configs import Codebook, Int8DynamicLowBit, UniformWeights, WeightOnly, WeightQAT
from deepshrink.quantization.lowbit.mixed import (WIDTHS, BitSensitivity, WidthChoice, apply_widths, bit_sensitivity,
                                                  choose_widths, evaluate_loss_accuracy, measure_front, pareto_front,
                                                  uniform_choice)
from deepshrink.quantization.lowbit.qat import convert_qat, prepare_qat, train_qat_
from deepshrink.quantization.lowbit.runtime import DynamicQuantLinear, runtime_weights, to_dynamic_lowbit_
from deepshrink.quantization.lowbit.storage import load_compressed, save_compressed
from deepshrink.quantization.lowbit.uniform import quantize_weights_
from deepshrink.quantization.lowbit.weights import AffineWeight, CodebookWeight, quantized_weights

__all__ = [
    "WeightOnly", "WeightQAT", "Codebook", "UniformWeights", "Int8DynamicLowBit",
    "to_dynamic_lowbit_", "DynamicQuantLinear", "runtime_weights",
    "quantize_weights_", "codebook_quantize_", "finetune_codebooks", "prepare_qat", "convert_qat", "train_qat_",
    "save_compressed", "load_compressed", "quantized_weights", "AffineWeight", "CodebookWeight",
    "WIDTHS", "BitSensitivity", "WidthChoice", "bit_sensitivity", "pareto_front", "choose_widths", "uniform_choice",
    "apply_widths", "measure_front", "evaluate_loss_accuracy",
]
