"""The ``<artifact>.json`` written beside every exported file.

It records what the runtime file cannot tell about itself (the dense parameter count, non-zero
weights, MACs of the model it came from) and the parity check done at export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from deepshrink.core.errors import ArtifactError
from deepshrink.core.io import atomic_write_text


def sidecar_path(artifact: str | os.PathLike) -> Path:
    path = Path(artifact)
    return path.with_name(path.name + ".json")


def write_sidecar(artifact: str | os.PathLike, info: Mapping[str, Any]) -> Path:
    return atomic_write_text(sidecar_path(artifact), json.dumps(dict(info), indent=2, sort_keys=True))


def read_sidecar(artifact: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar's fields (None when there is none); ``ArtifactError`` naming the file and the key
    when one deepshrink reads back is not what the exporter writes — the file travels with the
    artifact, so it may have been edited, truncated or replaced."""
    path = sidecar_path(artifact)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{path}: not a readable sidecar ({type(err).__name__}: {str(err)[:120]}); {_FIX}") from None
    if not isinstance(info, dict):
        raise ArtifactError(f"{path}: a sidecar is a JSON object, this one is a {_json_type(info)}; {_FIX}")
    for key, (check, expected) in _READ_BACK.items():
        if info.get(key) is not None and not check(info[key]):
            raise ArtifactError(f"{path}: {key!r} must be {expected}, got {json.dumps(info[key])[:80]}; {_FIX}")
    return info


_FIX = "delete it (the artifact loads without it) or export the model again"


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parity_entry(x: Any) -> bool:
    return (isinstance(x, dict) and isinstance(x.get("runtime"), str) and _number(x.get("max_abs_diff"))
            and isinstance(x.get("passed", True), bool)
            and isinstance(x.get("failures", []), list) and all(isinstance(f, str) for f in x.get("failures", []))
            and all(x.get(k) is None or _number(x[k]) for k in ("p99_steps", "argmax_agreement", "max_steps")))


def _sparse_decision(x: Any) -> bool:
    return isinstance(x, dict) and isinstance(x.get("layer"), str) and isinstance(x.get("runs_sparse"), bool)


def _delegation(x: Any) -> bool:
    outside = x.get("outside_delegate", {}) if isinstance(x, dict) else None
    return isinstance(outside, dict) and all(_count(n) for n in outside.values())


# the keys read back (by evaluate, the runner and the CLI): (check, what the exporter writes)
_READ_BACK = {
    "params": (_count, "a parameter count (an int >= 0)"),
    "nonzero_params": (_count, "a parameter count (an int >= 0)"),
    "macs": (_count, "a MAC count (an int >= 0)"),
    "parity": (lambda x: isinstance(x, list) and all(map(_parity_entry, x)),
               "a list of parity checks ({runtime: str, max_abs_diff: number, passed: bool, failures: [str], ...})"),
    "sparse_compute": (lambda x: isinstance(x, list) and all(map(_sparse_decision, x)),
                       "a list of {layer: str, runs_sparse: bool}"),
    "delegation": (_delegation, "an object whose outside_delegate maps operators to counts"),
}


def _json_type(x: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(type(x), type(x).__name__)
