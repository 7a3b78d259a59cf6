"""Signed int8 activations written as unsigned in the ``.onnx``: the same numbers, ONNX Runtime's fast kernels.

A graph quantized for XNNPACK (signed int8 activations: the ``s8s8*`` layouts, also what a
``.pte`` + ``.onnx`` recipe shares) reaches ONNX Runtime as ``QuantizeLinear -> DequantizeLinear``
pairs with int8 zero points. ONNX Runtime's x86 QLinearConv runs s8 activations on a slower path
(the zoo's mobile-cnn about 2x slower than the same file rewritten, in one ad-hoc run on an
AVX-512 VNNI EPYC; no benchmark table measures it).

``unsigned_activations`` rewrites each such pair to uint8 with the zero point plus 128. That is
exact: ``clamp(round(x / s) + z, -128, 127) + 128 == clamp(round(x / s) + z + 128, 0, 255)``, and
both dequantize to ``(q - z) * s``. Weights (a ``DequantizeLinear`` of an int8 initializer with
no ``QuantizeLinear`` before it) are left signed, as ONNX Runtime's u8 x s8 kernels want them;
a zero point that is computed at run time (dynamic quantization) is left alone.
"""
from __future__ import annotations


def unsigned_activations(model) -> int:
    """Rewrite int8 activation Q/DQ pairs of ``model`` (an ``onnx_ir`` model) to uint8; returns
    how many ``QuantizeLinear`` nodes changed."""
    import numpy as np
    import onnx_ir as ir

    shifted: dict[int, ir.Value] = {}

    def unsigned_zero(value: int) -> ir.Value:
        if value not in shifted:
            v = ir.Value(name=f"_deepshrink_u8_zero_point_{value + 128}", const_value=ir.tensor(np.array(value + 128, np.uint8)))
            model.graph.register_initializer(v)
            shifted[value] = v
        return shifted[value]

    changed, replaced = 0, []
    for node in list(model.graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        zero = node.inputs[2]
        if zero is None or zero.const_value is None or zero.const_value.dtype != ir.DataType.INT8 or zero.const_value.size != 1:
            continue
        if node.attributes.get("output_dtype") is not None:
            continue
        users = node.outputs[0].uses()
        if not users or any(u[0].op_type != "DequantizeLinear" or u[1] != 0 or len(u[0].inputs) < 3 for u in users):
            continue
        if any(u[0].inputs[2] is None or u[0].inputs[2].const_value is None
               or int(u[0].inputs[2].const_value.numpy().reshape(-1)[0]) != int(zero.const_value.numpy().reshape(-1)[0])
               for u in users):
            continue
        if node.outputs[0] in model.graph.outputs:
            continue
        replaced.append(zero)
        new_zero = unsigned_zero(int(zero.const_value.numpy().reshape(-1)[0]))
        node.replace_input_with(2, new_zero)
        node.outputs[0].dtype = ir.DataType.UINT8
        for user, _ in users:
            user.replace_input_with(2, new_zero)
        changed += 1
    for value in replaced:   # the int8 zero points no node reads any more
        if not value.uses() and value.is_initializer() and value.name in model.graph.initializers:
            model.graph.initializers.pop(value.name)
    return changed
