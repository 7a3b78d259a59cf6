"""Checks of a recipe beyond one config's own fields: names against the registries, stage order,
schedules against their retraining, seeds, and the user's own files. Each returns (or raises)
problems named by key path, for ``recipe.parse_recipe`` to report all at once."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepshrink.core.config import did_you_mean, short_repr
from deepshrink.core.errors import ConfigError
from deepshrink.pruning import Gradual, Iterative, OneShot

if TYPE_CHECKING:
    from deepshrink.pipeline.recipe import DataSpec, Recipe, Stage
    from deepshrink.training import TrainConfig

CHECKPOINTS = (".safetensors", ".dsk", ".pt2")
TRAINING_KINDS = ("train", "finetune", "prune", "quantize")   # the stages that may train, and take a device
SEED_RANGE = (0, 2**63)   # torch.manual_seed takes any int64; negatives are never meant


def schedule_problems(pruning: Any, schedule: Any, retrain: TrainConfig, path: str) -> list[str]:
    """What ``prune_with_schedule`` would refuse before its first epoch, found without a model."""
    from deepshrink.ops.masks import NM

    if pruning.sparsity is None:
        return [f"{path}.schedule: {type(pruning).__name__} without a sparsity learns its own during its training; "
                "a schedule needs a sparsity to ramp to: set sparsity, or drop the schedule"]
    if not isinstance(schedule, OneShot) and isinstance(pruning.parsed_pattern, NM):
        return [f"{path}.schedule: pattern {pruning.pattern} fixes every layer's sparsity at {pruning.sparsity:g}, "
                "so it cannot be reached step by step; use one-shot or an element/block pattern"]
    # prune_points' own checks and last epoch, computed without listing every step (steps: 10**12 is one int)
    final = pruning.sparsity
    if isinstance(schedule, Iterative):
        if schedule.sparsities and schedule.sparsities[-1] >= final:
            return [f"{path}.schedule.iterative.sparsities: {list(schedule.sparsities)} must stay below the target "
                    f"sparsity {final} (the last step always prunes to it); drop the stops at or above it"]
        last_epoch = len(schedule.sparsities) * schedule.epochs_per_step
    elif isinstance(schedule, Gradual):
        if schedule.initial >= final:
            return [f"{path}.schedule.gradual.initial: {schedule.initial} must be below the target sparsity {final}"]
        last_epoch = schedule.start + schedule.steps * schedule.interval
    else:
        last_epoch = 0
    if last_epoch > retrain.epochs:
        return [f"{path}.retrain.epochs: {retrain.epochs} ends before the schedule's last prune at epoch {last_epoch}; "
                f"set epochs >= {last_epoch} (and more to fine-tune after it)"]
    return []


def objective_problems(recipe: Recipe, stages: list[Stage | None]) -> list[str]:
    """``objective: latency|balanced`` chooses int8 or fp32 per layer at the int8-static/int8-dynamic
    quantize stage; without one there is nothing to choose."""
    from deepshrink.quantization import Int8Dynamic, Int8Static

    if recipe.objective == "size" or any(s is not None and s.kind == "quantize" and isinstance(s.config, (Int8Static, Int8Dynamic))
                                         for s in stages):
        return []
    return [f"objective: {recipe.objective} chooses per layer between int8 and fp32 by measured latency at a quantize stage "
            "with scheme int8-static or int8-dynamic, and this recipe has none; add one, or drop objective (size)"]


def seed_problems(recipe: Recipe, stages: list[Stage | None]) -> list[str]:
    """Every ``seed`` of the recipe within ``SEED_RANGE`` (torch refuses what does not fit in 64 bits)."""
    found: list[tuple[str, Any]] = [("recipe.seed", recipe.seed), ("recipe.data.seed", recipe.data.seed)]

    def walk(config: Any, path: str) -> None:
        if not dataclasses.is_dataclass(config):
            return
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.name == "seed" and isinstance(value, int):
                found.append((f"{path}.seed", value))
            elif f.name == "pruning":
                walk(value, path)     # a prune stage's criterion options sit at the stage's own level
            else:
                walk(value, f"{path}.{f.name}")

    for i, stage in enumerate(stages):
        if stage is not None:
            walk(stage.config, f"stages[{i}].{stage.kind}")
    lo, hi = SEED_RANGE
    return [f"{path}: {value} is outside [0, 2^63); use a small non-negative integer, e.g. 0"
            for path, value in found if not lo <= value < hi]


def device_problems(kind: Any, device: Any, path: str) -> list[str]:
    """A stage's ``device:``: only where it trains, one of cpu | cuda | auto, CUDA only where there is one."""
    from deepshrink.training.distributed import DEVICES

    if kind not in TRAINING_KINDS:
        return [f"{path}.device: only stages that train take a device ({', '.join(TRAINING_KINDS)}); "
                f"{kind} runs on the CPU: remove device"]
    if not isinstance(device, str) or device not in DEVICES:
        return [f"{path}.device: {short_repr(device)} is not one of {', '.join(DEVICES)}"
                + (did_you_mean(device, DEVICES) if isinstance(device, str) else "")]
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return [f"{path}.device: 'cuda' but torch finds no CUDA device here (torch.cuda.is_available() is False); "
                "use cpu, or auto (CUDA when present)"]
    return []


def stage_trains(stage: Stage) -> bool:
    """Whether a stage runs a training loop (every process of a distributed run takes part):
    train and finetune; prune with retraining or learned sparsity; quantize with QAT or fine-tuning."""
    if stage.kind in ("train", "finetune"):
        return True
    return stage.kind in TRAINING_KINDS and any(True for _ in _trainings(stage.config, ""))


def training_batch_problems(stages: Any, world_size: int) -> list[str]:
    """Every training batch size of ``stages`` must split evenly over ``world_size`` processes."""
    from deepshrink.training.distributed import batch_message

    if world_size <= 1:
        return []
    problems = []
    for i, stage in enumerate(stages):
        if stage is None or not stage_trains(stage):
            continue
        for path, config in _trainings(stage.config, f"stages[{i}].{stage.kind}", whole=stage.kind in ("train", "finetune")):
            batch = getattr(config, "batch_size", None)
            if isinstance(batch, int) and batch % world_size:
                problems.append(f"{path}.batch_size: {batch_message(batch, world_size)}")
    return problems


def _trainings(config: Any, path: str, *, whole: bool = False):
    """``(path, config)`` of each training inside ``config``: a ``TrainConfig`` (or a config with
    ``epochs`` / ``finetune_epochs``) of at least one epoch. ``fit`` without epochs joins no
    collective, so a stage whose trainings have none runs on rank 0 alone."""
    if not dataclasses.is_dataclass(config):
        return
    if whole or any(isinstance(getattr(config, f, None), int) and not isinstance(getattr(config, f), bool)
                    and getattr(config, f) > 0 for f in ("epochs", "finetune_epochs")):
        yield path, config
    for f in dataclasses.fields(config):
        # a prune stage's criterion options sit at the stage's own level
        yield from _trainings(getattr(config, f.name), path if f.name == "pruning" else f"{path}.{f.name}")


def check_model(spec: str) -> None:
    from deepshrink.core.userfile import is_spec
    from deepshrink.models.zoo import ZOO

    if spec in ZOO:
        return
    if spec.endswith(CHECKPOINTS):
        if not Path(spec).is_file():
            raise ConfigError(f"model: checkpoint {spec} does not exist{_where()}")
        return
    if is_spec(spec):
        if not Path(spec.rpartition(":")[0]).is_file():
            raise ConfigError(f"model: file {spec.rpartition(':')[0]} does not exist (from {spec!r})")
        return
    raise ConfigError(f"model: {short_repr(spec)} is not a zoo model ({', '.join(ZOO)}), a path/to/file.py:NAME, "
                      "or a .safetensors/.dsk/.pt2 checkpoint" + did_you_mean(spec, ZOO))


def checkpoint_problems(path: str, checkpoint: str) -> list[str]:
    """A ``load`` stage's checkpoint: a file of a kind that loads without running code."""
    if not checkpoint.endswith(CHECKPOINTS):
        return [f"{path}.checkpoint: {short_repr(checkpoint)} is not a .safetensors, .dsk or .pt2 checkpoint "
                "(pickled .pt/.pth files are not loaded: unpickling runs code)"]
    if not Path(checkpoint).is_file():
        return [f"{path}.checkpoint: {checkpoint} does not exist{_where()}"]
    return []


def _where() -> str:
    return f" (relative paths are from the current directory, {Path.cwd()})"


def check_user_data(spec: DataSpec) -> None:
    """Resolve every ``file.py:NAME`` of the data (importing the user's file, as running would)."""
    from deepshrink.core.errors import DataError
    from deepshrink.core.userfile import load_object

    for key in ("calib", "eval", "train", "collate"):
        value = getattr(spec, key)
        if value is None:
            continue
        try:
            fn = load_object(value, what=f"data.{key}", error=DataError)
        except DataError as err:
            raise ConfigError(str(err)) from None
        if not callable(fn):
            raise ConfigError(f"data.{key}: {value!r} is a {type(fn).__name__}, not a function returning samples")


def order_problems(kinds: list[str | None]) -> list[str]:
    """The order rules, on each stage's kind (None: a stage too malformed to have one)."""
    problems = []
    for i, kind in enumerate(kinds):
        before = kinds[:i]
        if kind in ("prune", "finetune") and "quantize" in before:
            problems.append(f"stages[{i}].{kind}: must come before quantize (a quantized graph is not trained or pruned here)")
        if kind == "quantize" and before.count("quantize"):
            problems.append(f"stages[{i}].quantize: the model is already quantized by stages[{before.index('quantize')}]")
        if kind == "report" and "evaluate" not in before:
            problems.append(f"stages[{i}].report: needs an evaluate stage before it")
        if kind == "load" and i != 0:
            problems.append(f"stages[{i}].load: load must be the first stage")
    return problems
