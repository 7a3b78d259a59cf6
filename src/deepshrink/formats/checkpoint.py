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
        return tensors, json.loads(raw_meta)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: checkpoint metadata is not valid JSON ({err})") from None
