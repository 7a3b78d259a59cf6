"""Optional runtimes, each installed by an extra: ``pip install 'deepshrink[onnx]'``.

The function that needs one calls ``require(...)`` right before importing it, so a missing runtime
is one line naming the extra, not a ``ModuleNotFoundError`` from deep inside a stage.
"""
from __future__ import annotations

import importlib.util

from deepshrink.core.errors import DeepshrinkError

# top-level module -> the extra (in pyproject.toml) that installs it
EXTRAS = {
    "executorch": "executorch",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
    "matplotlib": "report",
    "transformers": "hf",
}


class MissingExtraError(DeepshrinkError, ImportError):
    """An optional runtime is not installed; the message names the extra that brings it."""


def require(*modules: str) -> None:
    """Raise ``MissingExtraError`` unless every one of ``modules`` (keys of ``EXTRAS``) can be imported."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            extra = EXTRAS[module]
            raise MissingExtraError(f"{module} is not installed; it comes with the [{extra}] extra: "
                                    f"pip install 'deepshrink[{extra}]'")
