"""What a run carries between stages, and how it is saved after each stage so a run can resume."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.core.io import atomic_write_text
from deepshrink.core.masks import attach_masks, get_masks
from deepshrink.formats.checkpoint import read_checkpoint, write_checkpoint
from deepshrink.models.loading import load_checkpoint, save_checkpoint
from deepshrink.models.zoo import get_arch


@dataclass
class RunState:
    model: nn.Module
    baseline: nn.Module | None = None      # the dense fp32 model before compression
    baseline_macs: int | None = None
    quantization: dict | None = None       # set once the model is a quantized graph
    exports: dict[str, dict] = field(default_factory=dict)    # variant label -> {path, role, format, parity}
    variants: dict[str, dict] = field(default_factory=dict)   # variant label -> measured metrics
    log: list[dict] = field(default_factory=list)             # one entry per finished stage
    completed: int = 0

    def snapshot_baseline(self) -> None:
        self.baseline = copy.deepcopy(self.model)
        object.__setattr__(self.baseline, "_deepshrink_arch", getattr(self.model, "_deepshrink_arch", None))


def save_state(state: RunState, directory: Path, fingerprint: str, example_input: torch.Tensor) -> None:
    """Write the model(s) first, then ``state.json`` last: a crash in between leaves the old state."""
    directory.mkdir(parents=True, exist_ok=True)
    from deepshrink.quantization.lowbit import quantized_weights, save_compressed

    for stale in ("model.pt2", "model.dsk", "model.safetensors"):
        (directory / stale).unlink(missing_ok=True)
    if isinstance(state.model, torch.fx.GraphModule) or get_arch(state.model) is None:
        model_file = save_checkpoint(state.model, directory / "model.pt2", example_input=example_input).name
    elif quantized_weights(state.model):  # low-bit weights keep their codes across a resume
        model_file = save_compressed(state.model, directory / "model.dsk").name
    else:
        model_file = save_checkpoint(state.model, directory / "model.safetensors").name
    masks = get_masks(state.model)
    if masks:
        write_checkpoint(directory / "masks.safetensors", {k: v.to(torch.uint8) for k, v in masks.items()}, {"kind": "masks"})
    if state.baseline is not None:
        save_checkpoint(state.baseline, directory / "baseline.safetensors")
    atomic_write_text(directory / "state.json", json.dumps({
        "fingerprint": fingerprint, "completed": state.completed, "model_file": model_file, "has_masks": bool(masks),
        "has_baseline": state.baseline is not None, "baseline_macs": state.baseline_macs, "quantization": state.quantization,
        "exports": state.exports, "variants": state.variants, "log": state.log,
    }, indent=2))


def load_state(directory: Path, fingerprint: str, *, code: str | None = None) -> RunState | None:
    """The saved state of the same recipe, or ``None`` when there is none to resume. ``code``: the
    recipe's own ``file.py:NAME`` model, which rebuilds a state saved from it."""
    path = directory / "state.json"
    if not path.is_file():
        return None
    saved: dict[str, Any] = json.loads(path.read_text())
    if saved.get("fingerprint") != fingerprint:
        return None
    model = load_checkpoint(directory / saved["model_file"], code=code)
    if saved["quantization"] is not None:
        object.__setattr__(model, "_deepshrink_quant", saved["quantization"])
    if saved["has_masks"]:
        masks, _ = read_checkpoint(directory / "masks.safetensors")
        attach_masks(model, {k: v.bool() for k, v in masks.items()})
    baseline = load_checkpoint(directory / "baseline.safetensors", code=code) if saved["has_baseline"] else None
    return RunState(
        model=model, baseline=baseline, baseline_macs=saved["baseline_macs"], quantization=saved["quantization"],
        exports=saved["exports"], variants=saved["variants"], log=saved["log"], completed=saved["completed"],
    )
