"""Quantization: one verb, ``quantize(model, config, data=...)``, the scheme chosen by the config's type.

It returns the model to use (a new int8 graph, or the same eager module for weight-only schemes):
keep the return value. Schemes: ``Int8Static``, ``Int8Dynamic``, ``Int8QAT``, ``Int8WithinBudget``
(PTQ, then per-layer fp32 fallback, then QAT until the accuracy drop fits), and the low-bit
``WeightOnly``, ``WeightQAT``, ``Codebook``, ``Int8DynamicLowBit`` (``quantization.lowbit``). ``quantize_report(model)``
says what was done; ``activation_ranges`` (what calibration chose, per layer) and
``layer_sqnr_report`` (which layer loses the signal) look closer. The schemes that train or measure
take the loop as ``train_fn`` / ``accuracy_fn`` (``core.loops``); ``deepshrink.quantize`` supplies
``deepshrink.training``'s.
"""
from deepshrink.quantization.api import QUANTIZERS, activation_ranges, quantize, quantize_report
from deepshrink.quantization.configs import Int8Dynamic, Int8QAT, Int8Static, Int8WithinBudget, MixedPrecision
from deepshrink.quantization import lowbit  # noqa: E402,F401  (registers WeightOnly, WeightQAT, Codebook)
from deepshrink.quantization.lowbit import Codebook, Int8DynamicLowBit, WeightOnly, WeightQAT

__all__ = ["quantize", "quantize_report", "activation_ranges", "QUANTIZERS", "Int8Static", "Int8Dynamic", "Int8QAT",
           "Int8WithinBudget", "MixedPrecision", "WeightOnly", "WeightQAT", "Codebook", "Int8DynamicLowBit", "layer_sqnr_report", "quantize_within_budget"]


def __getattr__(name: str):
    # the report and the budget search pull in torchao/executorch; load them on first use
    if name == "layer_sqnr_report":
        from deepshrink.quantization.report import layer_sqnr_report

        return layer_sqnr_report
    if name == "quantize_within_budget":
        from deepshrink.quantization.budget import quantize_within_budget

        return quantize_within_budget
    raise AttributeError(f"module 'deepshrink.quantization' has no attribute {name!r}")
