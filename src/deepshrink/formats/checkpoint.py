"""Plain checkpoints: safetensors (tensors only, no code) with a JSON metadata entry.

Loading never unpickles: safetensors holds raw tensor bytes and a string header.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from deepshrink.core.errors import ArtifactError
from deepshrink.core.io import atomic_path

META_KEY = "deepshrink"


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={META_KEY: json.dumps(dict(metadata), sort_keys=True)})
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if raw_meta is None:
        raise ArtifactError(f"{path}: safetensors file has no '{META_KEY}' metadata; save it with deepshrink.models.save_checkpoint")
    try:
        meta = json.loads(raw_meta)
    except (ValueError, RecursionError) as err:
        raise ArtifactError(f"{path}: checkpoint metadata '{META_KEY}' is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: checkpoint metadata '{META_KEY}' must be a JSON object, got a {type(meta).__name__}; "
                            "save the model again with deepshrink.models.save_checkpoint")
    if not isinstance(meta.get("arch", {}), dict):
        raise ArtifactError(f"{path}: checkpoint metadata '{META_KEY}.arch' must be an object saying how to rebuild the "
                            f"model, got a {type(meta['arch']).__name__}; save the model again with deepshrink.models.save_checkpoint")
    return tensors, meta
