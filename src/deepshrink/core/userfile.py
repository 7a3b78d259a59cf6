"""``path/to/file.py:NAME`` — an object from the user's own Python file.

Importing the file runs its code: that is why a name like this is taken only from what the person
running deepshrink wrote (a recipe, a command line, an API call), never from inside a checkpoint.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from deepshrink.core.errors import DeepshrinkError


def is_spec(text: object) -> bool:
    return isinstance(text, str) and ":" in text and text.rpartition(":")[0].endswith(".py")


def load_object(spec: str, *, what: str, error: type[DeepshrinkError]) -> Any:
    """The object ``NAME`` defined by ``file.py`` (imported once per process and path)."""
    file_part, _, name = spec.rpartition(":")
    path = Path(file_part)
    if not file_part.endswith(".py") or not name:
        raise error(f"{what}: {spec!r} is not path/to/file.py:NAME")
    if not path.is_file():
        raise error(f"{what}: file {path} does not exist (from {spec!r})")
    module_name = f"deepshrink_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except BaseException as err:  # the user's file may raise anything, even SystemExit
            sys.modules.pop(module_name, None)
            if isinstance(err, KeyboardInterrupt):
                raise
            raise error(f"{what}: importing {path} failed: {type(err).__name__}: {err}") from None
    if not hasattr(module, name):
        raise error(f"{what}: {path} defines no {name!r}")
    return getattr(module, name)
