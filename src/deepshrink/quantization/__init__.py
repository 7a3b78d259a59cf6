"""Quantization: ``quantize(model, Int8Static(...), data=...)`` returns the quantized model.

Also: ``activation_ranges`` (what calibration chose, per layer), ``layer_sqnr_report``
(which layer loses the signal), ``quantize_within_budget`` (PTQ, then per-layer fp32
fallback, then QAT until the accuracy drop fits).
"""
from deepshrink.quantization.api import activation_ranges, quantize
from deepshrink.quantization.configs import Int8Dynamic, Int8QAT, Int8Static, Int8WithinBudget
from deepshrink.quantization import lowbit  # noqa: E402,F401  (registers WeightOnly, WeightQAT, Codebook)

__all__ = ["quantize", "activation_ranges", "Int8Static", "Int8Dynamic", "Int8QAT", "Int8WithinBudget", "layer_sqnr_report", "quantize_within_budget"]


def __getattr__(name: str):
    # the report and the budget search pull in torchao/executorch; load them on first use
    if name == "layer_sqnr_report":
        from deepshrink.quantization.report import layer_sqnr_report

        return layer_sqnr_report
    if name == "quantize_within_budget":
        from deepshrink.quantization.budget import quantize_within_budget

        return quantize_within_budget
    raise AttributeError(f"module 'deepshrink.quantization' has no attribute {name!r}")
