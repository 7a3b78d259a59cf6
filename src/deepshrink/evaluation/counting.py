"""Parameter, non-zero and MAC counts: eager modules (from core) and ONNX files."""
from __future__ import annotations

# the eager counts live in core: pruning's MAC budget needs them, and pruning does not import evaluation
from deepshrink.core.counting import count_macs, parameter_counts
from deepshrink.core.extras import require

__all__ = ["count_macs", "onnx_parameter_counts", "parameter_counts"]


def onnx_parameter_counts(path) -> tuple[int, int]:
    """(parameters, non-zero) over an ONNX file's initializers, read from the file itself.

    Scales and zero points (inputs 1 and 2 of QuantizeLinear/DequantizeLinear) are not counted.
    """
    require("onnx")
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    qparams = {
        name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        for name in node.input[1:]
    }
    total = nonzero = 0
    for init in model.graph.initializer:
        if init.name in qparams:
            continue
        array = numpy_helper.to_array(init)
        if array.ndim == 0 or array.dtype.kind not in "fiu" or array.dtype.itemsize == 8:  # int64 = shapes
            continue
        total += array.size
        nonzero += int((array != 0).sum())
    return total, nonzero
