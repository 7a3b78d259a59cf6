"""Run a validated recipe stage by stage. The CLI and the Python API share this one runner.

After every stage the run state is saved under ``<out>/state``; ``resume=True`` continues a run
of the same recipe from its last finished stage.

Under torchrun every process runs this: rank 0 runs every stage and alone writes files; the
others join only the stages that train (``recipe_checks.stage_trains``), each time from rank 0's
saved state, broadcast (``training.distributed``), and end after the last of them.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from deepshrink.core.targets import TargetProfile, get_target
from deepshrink.data import DataSplits
from deepshrink.data import load as load_data
from deepshrink.pipeline.recipe import Recipe, Stage
from deepshrink.pipeline.state import RunState, load_state, remove_leftovers, save_state


@dataclass
class RunContext:
    recipe: Recipe
    data: DataSplits
    target: TargetProfile
    out_dir: Path
    progress: bool
    log: Callable[[str], None]

    def example_batch(self, n: int):
        """Up to ``n`` real test inputs as one batch (those shaped like the first, when shapes vary)."""
        return self.data.example_batch(n)


@dataclass
class RunResult:
    out_dir: Path
    state: RunState
    metrics_path: Path | None
    report_path: Path | None


def _stderr_log(message: str) -> None:
    logging.getLogger(__name__).info(message)


def run_recipe(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    data: DataSplits | None = None,
    model: nn.Module | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = _stderr_log,
) -> RunResult:
    """Run every stage of ``recipe``, writing artifacts under ``out_dir``.

    ``data`` / ``model``: bring your own ``DataSplits`` or ``nn.Module`` instead of the recipe's.
    Started by torchrun, the processes train together (see the module's docstring).
    """
    from deepshrink.training import distributed

    joined = distributed.start()
    try:
        return _run_recipe(recipe, out_dir, resume=resume, data=data, model=model, progress=progress, log=log)
    finally:
        if joined:
            distributed.stop()


def _run_recipe(recipe: Recipe, out_dir: str | os.PathLike, *, resume: bool, data: DataSplits | None,
                model: nn.Module | None, progress: bool | None, log: Callable[[str], None]) -> RunResult:
    from deepshrink.core.errors import ConfigError
    from deepshrink.pipeline import stages  # handlers import the heavy layers
    from deepshrink.pipeline.recipe_checks import stage_trains, training_batch_problems
    from deepshrink.training import distributed

    world = distributed.world()
    problems = training_batch_problems(recipe.stages, world.size)
    if problems:
        raise ConfigError(*problems)
    out = Path(out_dir)
    if world.main:
        from deepshrink.core.io import writable_dir

        writable_dir(out)   # a file, a read-only place: one line now, not a traceback after the training
        remove_leftovers(out)   # what a killed run left half-written
    else:   # rank 0 reports; the others stay silent
        progress, log = False, (lambda message: None)
    torch.manual_seed(recipe.seed)
    spec = recipe.data
    if data is None and spec.user_samples:
        data = user_data(spec)
    elif data is None:
        data = load_data(spec.name, data_dir=spec.data_dir, download=spec.download, image_size=spec.image_size, calib_size=spec.calib_size, seed=spec.seed)
    dynamic = next((s.config.dynamic for s in recipe.stages if s.kind == "export" and s.config.dynamic), None)
    if dynamic:
        import dataclasses

        # one description of what varies, read by every capture: quantization and export alike
        data = dataclasses.replace(data, dynamic=dynamic)
    ctx = RunContext(recipe, data, get_target(recipe.target), out, sys.stderr.isatty() if progress is None else progress, log)
    state_dir = out / "state"
    from deepshrink.core.userfile import is_spec

    # the recipe names the user's code; that (never a path inside a saved file) rebuilds its model
    code = recipe.model if is_spec(recipe.model) else None
    state = load_state(state_dir, recipe.fingerprint(), code=code) if resume and world.main else None
    if state is not None:
        log(f"resuming {recipe.name}: stages 1-{state.completed} already done")
    else:
        state = RunState(model=model if model is not None else stages.initial_model(recipe))
        stages.check_fits(state.model, ctx)
    completed = distributed.broadcast(state.completed)
    last_training = max((i for i, s in enumerate(recipe.stages) if stage_trains(s)), default=-1)
    for index, stage in enumerate(recipe.stages):
        if index < completed:
            continue
        trains = stage_trains(stage)
        if not world.main and index > last_training:
            break   # nothing left that trains: rank 0 exports, evaluates and reports alone
        if not world.main and not trains:
            continue
        if trains and world.size > 1:
            state = _shared_state(state, state_dir, index, recipe.fingerprint(), code)
        log(f"[{index + 1}/{len(recipe.stages)}] {stage.kind}" + (f" on {world.size} processes" if trains and world.size > 1 else ""))
        started = time.perf_counter()
        with distributed.training_device(stage.device):
            summary = stages.HANDLERS[stage.kind](state, stage.config, ctx)
        if not world.main:
            continue
        seconds = time.perf_counter() - started
        entry = {"index": index, "stage": stage.as_dict(), "seconds": round(seconds, 3), "summary": summary}
        if trains:
            entry["training"] = {"world_size": world.size, "backend": world.backend,
                                 "device": str(distributed.resolve_device(stage.device))}
        state.log.append(entry)
        state.completed = index + 1
        log(f"      {stage.kind} done in {seconds:.1f} s" + (f": {summary['line']}" if summary.get("line") else ""))
        save_state(state, state_dir, recipe.fingerprint(), ctx.example_batch(2))
        if stage.kind == "evaluate":
            refresh_stage_log(out / "metrics.json", state.log)
    if not world.main:
        return RunResult(out, state, None, None)
    metrics = out / "metrics.json"
    report = out / "report.html"
    return RunResult(out, state, metrics if metrics.is_file() else None, report if report.is_file() else None)


def _shared_state(state: RunState, state_dir: Path, index: int, fingerprint: str, code: str | None) -> RunState:
    """Rank 0's state before training stage ``index`` (the one it saved after the stage before), and
    its RNG, on every process: the others skipped the stages rank 0 ran alone and need not share its
    disk. Before the first stage there is nothing to share (all build the same model; DDP copies
    rank 0's weights)."""
    import tempfile

    from deepshrink.training import distributed

    files = _saved_files(state_dir) if distributed.is_main() and index > 0 else None
    files, rng = distributed.broadcast((files, torch.get_rng_state()))
    torch.set_rng_state(rng)
    if distributed.is_main() or files is None:
        return state
    with tempfile.TemporaryDirectory(prefix="deepshrink-rank-") as tmp:
        for name, content in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(content)
        shared = load_state(Path(tmp), fingerprint, code=code)
    if shared is None:
        raise RuntimeError(f"rank {distributed.world().rank}: rank 0's run state did not load")
    return shared


def _saved_files(state_dir: Path) -> dict[str, bytes]:
    """``state.json`` and the model files it names, by path relative to ``state_dir``."""
    import json

    generation = json.loads((state_dir / "state.json").read_text()).get("generation")
    folder = state_dir / generation if generation else state_dir   # states saved before generations: flat
    files = {"state.json": (state_dir / "state.json").read_bytes()}
    for path in folder.iterdir():
        if path.is_file() and path.suffix in (".safetensors", ".dsk", ".pt2"):
            files[str(path.relative_to(state_dir))] = path.read_bytes()
    return files


def user_data(spec) -> DataSplits:
    """The recipe's ``data: {calib: file.py:NAME, eval: file.py:NAME, ...}`` (runs those files' code)."""
    from deepshrink.core.errors import DataError
    from deepshrink.core.userfile import load_object
    from deepshrink.data.splits import from_spec_functions

    fns = {k: load_object(getattr(spec, k), what=f"data.{k}", error=DataError)
           for k in ("calib", "eval", "train", "collate") if getattr(spec, k) is not None}
    return from_spec_functions(calib=fns["calib"], eval=fns["eval"], train=fns.get("train"), batch_dim=spec.batch_dim,
                               collate=fns.get("collate"), name=spec.name, seed=spec.seed)


def refresh_stage_log(metrics_path: Path, log: list[dict]) -> None:
    """metrics.json is written inside the evaluate stage; add that stage's own entry afterwards."""
    import json

    from deepshrink.pipeline.metrics_doc import write_metrics

    document = json.loads(metrics_path.read_text())
    document["stages"] = log
    write_metrics(metrics_path, document)
