"""The ``<artifact>.json`` written beside every exported file.

It records what the runtime file cannot tell about itself (the dense parameter count, non-zero
weights, MACs of the model it came from) and the parity check done at export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from deepshrink.core.io import atomic_write_text


def sidecar_path(artifact: str | os.PathLike) -> Path:
    path = Path(artifact)
    return path.with_name(path.name + ".json")


def write_sidecar(artifact: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    return atomic_write_text(sidecar_path(artifact), json.dumps(dict(info), indent=2, sort_keys=True))


def read_sidecar(artifact: str | os.PathLike) -> dict[str, Any] | None:
    path = sidecar_path(artifact)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
