"""Parameter, non-zero and MAC counts: eager modules (from core) and ONNX files."""
from __future__ import annotations

import json
import math

# the eager counts live in core: pruning's MAC budget needs them, and pruning does not import evaluation
from deepshrink.core.counting import count_macs, parameter_counts
from deepshrink.core.extras import require

__all__ = ["count_macs", "onnx_parameter_counts", "parameter_counts", "storage_records"]

STORAGE_METADATA = "deepshrink.storage"   # written by deploy.onnx_storage: the weights stored as codes
STORAGE_PART = ":"                        # ... each in arrays named <weight>:<role>


def onnx_parameter_counts(path) -> tuple[int, int]:
    """(parameters, non-zero) over an ONNX file's initializers, read from the file itself.

    Scales and zero points (inputs 1 and 2 of QuantizeLinear/DequantizeLinear) are not counted.
    A weight stored as its codes (``deploy.onnx_storage``) counts as the tensor it decodes to.
    """
    require("onnx")
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    stored = storage_records(model)
    weights = {record["name"] for record in stored}
    qparams = {
        name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
        for name in node.input[1:]
    }
    total = sum(math.prod(record["shape"]) for record in stored)
    nonzero = sum(record["nonzero"] for record in stored)
    for init in model.graph.initializer:
        if init.name in qparams or init.name.rpartition(STORAGE_PART)[0] in weights:
            continue
        array = numpy_helper.to_array(init)
        if array.ndim == 0 or array.dtype.kind not in "fiu" or array.dtype.itemsize == 8:  # int64 = shapes
            continue
        total += array.size
        nonzero += int((array != 0).sum())
    return total, nonzero


def storage_records(model_proto) -> list[dict]:
    """The weights ``deploy.onnx_storage`` stored as codes in an ``onnx.ModelProto``, one record each
    (``name``, ``shape``, ``nonzero``); ``[]`` for a plain file."""
    for prop in model_proto.metadata_props:
        if prop.key == STORAGE_METADATA:
            return [{"name": n, "shape": shape, "nonzero": nz} for n, shape, nz in json.loads(prop.value)]
    return []
