"""What a runtime file says it takes, and the check of a batch against it before the runtime runs it.

An input is ``(sizes, dtype name)``; a size of None varies. ExecuTorch reports its memory plan's
sizes (upper bounds), ONNX Runtime and ``torch.export`` the exact static sizes. A batch that does
not fit is a ``DataError`` naming the input, the dimension and what the file expects — instead of
the runtime's ``0x12`` or a guard's assertion.
"""
from __future__ import annotations

import torch
from torch import nn

from deepshrink.core.errors import DataError

# ExecuTorch ScalarType codes (c10 numbering) and ONNX tensor types -> torch dtype names
ET_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
              7: "float64", 11: "bool", 15: "bfloat16"}
ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def pte_inputs(metadata) -> list:
    out = []
    for i in range(metadata.num_inputs()):
        try:
            info = metadata.input_tensor_meta(i)
        except Exception:  # a non-tensor input (an int, a list) has no tensor meta
            out.append(None)
            continue
        out.append((tuple(int(d) for d in info.sizes()), ET_DTYPES.get(int(info.dtype()))))
    return out


def program_inputs(module: nn.Module) -> list | None:
    """(sizes, dtype) of each input of an unlifted ``torch.export`` program: a size of None varies."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    out = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None   # a non-tensor input: nothing to check
        out.append((tuple(d if isinstance(d, int) else None for d in val.shape), str(val.dtype).removeprefix("torch.")))
    return out


def _mismatch(i: int, tensor: torch.Tensor, expected, *, planned: bool, names=None) -> str | None:
    """Why input ``i`` cannot run, or None. ``planned``: sizes are upper bounds (an ExecuTorch memory plan)."""
    if expected is None:
        return None
    sizes, dtype = expected
    label = f"input {i}" + (f" ({names[i]!r})" if names else "")
    got = str(tensor.dtype).removeprefix("torch.")
    if dtype is not None and got != dtype and not (dtype == "float32" and tensor.is_floating_point() and not planned):
        return f"{label} is {got}, the file takes {dtype}"
    if tensor.dim() != len(sizes):
        return f"{label} has shape {list(tensor.shape)} ({tensor.dim()} dims), the file takes {len(sizes)} dims {_show(sizes)}"
    for d, (have, want) in enumerate(zip(tensor.shape, sizes)):
        if d == 0 or want is None:
            continue   # the batch is fed in chunks the file takes
        if (have > want) if planned else (have != want):
            return (f"{label} has shape {list(tensor.shape)}, the file takes {_show(sizes)}: dim {d} is {have}, "
                    f"expected {'at most ' if planned else ''}{want}")
    return None


def _show(sizes) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in sizes) + "]"


def check_inputs(path, tensors, expected, *, planned: bool, names=None) -> None:
    """``DataError`` naming the input and dimension that do not fit what the file takes."""
    if expected is None:
        return
    if len(tensors) != len(expected):
        raise DataError(f"{path}: the file takes {len(expected)} input(s), the data gives {len(tensors)}")
    for i, (tensor, want) in enumerate(zip(tensors, expected)):
        why = _mismatch(i, tensor, want, planned=planned, names=names)
        if why:
            raise DataError(f"{path}: {why}; evaluate it on data of the shape it was exported with"
                            + (" (the CLI's --image-size sets the image side)" if tensor.dim() == 4 else ""))


def shape_mismatch(tensors, expected) -> str | None:
    """After a failed ExecuTorch call: the first input dimension that differs from the plan's."""
    for i, (tensor, want) in enumerate(zip(tensors, expected or [])):
        if want is None or tensor.dim() != len(want[0]):
            continue
        for d, (have, size) in enumerate(zip(tensor.shape, want[0])):
            if d and have != size:
                return (f"input {i} has shape {list(tensor.shape)}, the program was exported for {_show(want[0])}: "
                        f"dim {d} is {have}, expected {size}")
    return None
