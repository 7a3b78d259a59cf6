"""Child process that loads runtime files for ``evaluation.isolation``: run as a script, never imported.

A corrupted program can abort or segfault inside a native runtime; here that ends this process
only, and the parent reports it as an error. Protocol: one JSON request per line on stdin,
``{"kind": "pte" | "onnx", "path": file}``; one JSON reply per line on the original stdout,
``{"ok": bool, "error": str, "log": str, "inputs": [...], "executed": str | None}``. Anything
the runtimes print goes to stderr, never into the replies. Imports only the standard library
until a request names its runtime, so it starts fast.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

# the tables of evaluation.input_meta, repeated: this script imports nothing of deepshrink
# ExecuTorch ScalarType codes -> torch dtype names (c10 numbering)
_ET_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
              7: "float64", 11: "bool", 15: "bfloat16"}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(int16)": "int16"}


def _probe_pte(path: str) -> dict:
    import executorch.kernels.quantized  # noqa: F401  embedding_byte / embedding_4bit (see runners.PteRunner)
    import torch
    from executorch.runtime import Runtime

    with open(path, "rb") as handle:
        data = handle.read()
    program = Runtime.get().load_program(data)
    method = program.load_method("forward")
    meta = method.metadata
    inputs = []
    for i in range(meta.num_inputs()):
        try:
            info = meta.input_tensor_meta(i)
            inputs.append({"sizes": [int(d) for d in info.sizes()], "dtype": _ET_DTYPES.get(int(info.dtype()))})
        except Exception:  # a non-tensor input (an int, a list) has no tensor meta
            inputs.append(None)
    executed = None
    if all(i is not None and i["dtype"] for i in inputs):
        # one call on zeros (batch 1, the rest as planned) reaches the kernels and the delegate's
        # own payload, where a corrupted program crashes if loading did not
        feeds = [torch.zeros([1, *i["sizes"][1:]] if i["sizes"] else [], dtype=getattr(torch, i["dtype"]))
                 for i in inputs]
        try:
            method.execute(feeds)
        except Exception as err:  # not the file's fault by itself: a static batch, a shape the data sets
            executed = f"{type(err).__name__}: {err}"
    return {"inputs": inputs, "executed": executed}


def _probe_onnx(path: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = [{"name": i.name, "sizes": [d if isinstance(d, int) else None for d in (i.shape or [])],
               "dtype": _ORT_DTYPES.get(i.type)} for i in session.get_inputs()]
    executed = None
    if all(i["dtype"] for i in inputs):
        feeds = {i["name"]: np.zeros([1 if d is None else d for d in i["sizes"]], dtype=i["dtype"]) for i in inputs}
        try:
            session.run(None, feeds)
        except Exception as err:  # a symbolic dimension that must not be 1, and the like
            executed = f"{type(err).__name__}: {err}"
    return {"inputs": inputs, "executed": executed}


PROBES = {"pte": _probe_pte, "onnx": _probe_onnx}


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # a runtime writing to stdout must not corrupt the replies
    for line in sys.stdin:
        log = io.StringIO()
        try:
            request = json.loads(line)
            with contextlib.redirect_stderr(log):   # ExecuTorch logs through Python's sys.stderr
                reply = {"ok": True, **PROBES[request["kind"]](request["path"])}
        except Exception as err:  # the runtimes raise their own types for a bad file
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        reply["log"] = log.getvalue()[-4000:]
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
