"""What a run carries between stages, and how it is saved after each stage so a run can resume."""
from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.core.errors import ArtifactError, DeepshrinkError
from deepshrink.core.io import atomic_write_text
from deepshrink.core.masks import attach_masks, without_masks
from deepshrink.formats.checkpoint import read_checkpoint, write_checkpoint
from deepshrink.models.loading import load_checkpoint, save_checkpoint
from deepshrink.models.zoo import get_arch

GENERATION = "gen-"   # <out>/state/gen-<stages done>-<unique>/: the files of one saved state
_GENERATION_NAME = re.compile(r"gen-\d+-\w+")
_MODEL_FILES = ("model.pt2", "model.dsk", "model.safetensors")


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
    """Write the model(s) into a fresh generation folder, then replace ``state.json`` (which names that
    folder) in one step, and only then delete what the old state named: a crash at any point leaves
    either the old state or the new one whole."""
    directory.mkdir(parents=True, exist_ok=True)
    from deepshrink.quantization.lowbit import quantized_weights, save_compressed

    generation = Path(tempfile.mkdtemp(prefix=f"{GENERATION}{state.completed:03d}-", dir=directory))
    try:
        # the model file holds the plain module (pruned weights as zeros, plain names); masks go beside it
        with without_masks(state.model) as masks:
            if isinstance(state.model, torch.fx.GraphModule) or get_arch(state.model) is None:
                model_file = save_checkpoint(state.model, generation / "model.pt2", example_input=example_input).name
            elif quantized_weights(state.model):  # low-bit weights keep their codes across a resume
                model_file = save_compressed(state.model, generation / "model.dsk").name
            else:
                model_file = save_checkpoint(state.model, generation / "model.safetensors").name
        if masks:
            write_checkpoint(generation / "masks.safetensors", {k: v.to(torch.uint8) for k, v in masks.items()}, {"kind": "masks"})
        if state.baseline is not None:
            save_checkpoint(state.baseline, generation / "baseline.safetensors")
        atomic_write_text(directory / "state.json", json.dumps({
            "fingerprint": fingerprint, "completed": state.completed, "generation": generation.name, "model_file": model_file,
            "has_masks": bool(masks), "has_baseline": state.baseline is not None, "baseline_macs": state.baseline_macs,
            "quantization": state.quantization, "exports": state.exports, "variants": state.variants, "log": state.log,
        }, indent=2))
    except BaseException:   # a failed save leaves the old state; a kill leaves its folder to remove_leftovers
        if _named_generation(directory) != generation.name:
            shutil.rmtree(generation, ignore_errors=True)
        raise
    _remove_unnamed(directory, generation.name)


def remove_leftovers(out_dir: Path) -> None:
    """At the start of a run, delete what no saved state names: half-written ``.tmp-*`` files
    (``core.io``'s atomic writes, left by a kill) in ``out_dir`` and its state folder, and generation
    folders other than the one ``state.json`` names (a save killed before it replaced ``state.json``)."""
    directory = out_dir / "state"
    current = _named_generation(directory)
    for folder in (out_dir, directory, directory / current if current else None):
        if folder is not None and folder.is_dir():
            for leftover in folder.glob(".tmp-*"):
                if leftover.is_file() and not leftover.is_symlink():
                    leftover.unlink(missing_ok=True)
    if directory.is_dir():
        _remove_unnamed(directory, current)


def _remove_unnamed(directory: Path, current: str | None) -> None:
    """Generation folders other than ``current``, and, once a generation is current, the model files
    of the older flat layout."""
    for generation in directory.glob(f"{GENERATION}*"):
        if generation.name != current and generation.is_dir() and not generation.is_symlink():
            shutil.rmtree(generation, ignore_errors=True)
    if current:
        for flat in ("model.pt2", "model.dsk", "model.safetensors", "masks.safetensors", "baseline.safetensors"):
            (directory / flat).unlink(missing_ok=True)


def _named_generation(directory: Path) -> str | None:
    """The generation folder ``state.json`` names, or None (no state, the flat layout, or unreadable)."""
    try:
        name = json.loads((directory / "state.json").read_text()).get("generation")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and _GENERATION_NAME.fullmatch(name) else None


def load_state(directory: Path, fingerprint: str, *, code: str | None = None) -> RunState | None:
    """The saved state of the same recipe, or ``None`` when there is none to resume. ``code``: the
    recipe's own ``file.py:NAME`` model, which rebuilds a state saved from it. A state that is there
    but cannot be loaded is one ``ArtifactError`` naming the file and the way out."""
    path = directory / "state.json"
    if not path.is_file():
        return None
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"it holds a JSON {type(saved).__name__}, not an object")
    except (OSError, ValueError) as err:
        raise _unresumable(path, f"not readable state JSON ({err})") from None
    if saved.get("fingerprint") != fingerprint:
        return None
    try:
        return _load_saved(directory, saved, code=code)
    except DeepshrinkError as err:
        raise _unresumable(path, str(err)) from None
    except (KeyError, TypeError, ValueError) as err:  # a state.json of another version, or edited
        raise _unresumable(path, f"{type(err).__name__}: {err}") from None


def _load_saved(directory: Path, saved: dict[str, Any], *, code: str | None) -> RunState:
    generation = saved.get("generation")
    if generation is not None and not (isinstance(generation, str) and _GENERATION_NAME.fullmatch(generation)):
        raise ValueError(f"generation {generation!r} is not a folder name this runner writes")
    files = directory / generation if generation else directory   # states saved before generations: flat
    if saved["model_file"] not in _MODEL_FILES:
        raise ValueError(f"model_file {saved['model_file']!r} is not one of {', '.join(_MODEL_FILES)}")
    model = load_checkpoint(files / saved["model_file"], code=code)
    if saved["quantization"] is not None:
        object.__setattr__(model, "_deepshrink_quant", saved["quantization"])
    if saved["has_masks"]:
        masks, _ = read_checkpoint(files / "masks.safetensors")
        attach_masks(model, {k: v.bool() for k, v in masks.items()})
    baseline = load_checkpoint(files / "baseline.safetensors", code=code) if saved["has_baseline"] else None
    return RunState(
        model=model, baseline=baseline, baseline_macs=saved["baseline_macs"], quantization=saved["quantization"],
        exports=saved["exports"], variants=saved["variants"], log=saved["log"], completed=int(saved["completed"]),
    )


def _unresumable(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"resume: the saved run state {path} cannot be loaded: {why}. Run without --resume "
                         "(resume=False) to start the recipe over; that replaces the saved state")
