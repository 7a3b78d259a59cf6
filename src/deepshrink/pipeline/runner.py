"""Run a validated recipe stage by stage. The CLI and the Python API share this one runner.

After every stage the run state is saved under ``<out>/state``; ``resume=True`` continues a run
of the same recipe from its last finished stage.
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
    """
    from deepshrink.pipeline import stages  # handlers import the heavy layers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)   # what a killed run left half-written
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
    state = load_state(state_dir, recipe.fingerprint(), code=code) if resume else None
    if state is not None:
        log(f"resuming {recipe.name}: stages 1-{state.completed} already done")
    else:
        state = RunState(model=model if model is not None else stages.initial_model(recipe))
    for index, stage in enumerate(recipe.stages):
        if index < state.completed:
            continue
        log(f"[{index + 1}/{len(recipe.stages)}] {stage.kind}")
        started = time.perf_counter()
        summary = stages.HANDLERS[stage.kind](state, stage.config, ctx)
        seconds = time.perf_counter() - started
        state.log.append({"index": index, "stage": stage.as_dict(), "seconds": round(seconds, 3), "summary": summary})
        state.completed = index + 1
        log(f"      {stage.kind} done in {seconds:.1f} s" + (f": {summary['line']}" if summary.get("line") else ""))
        save_state(state, state_dir, recipe.fingerprint(), ctx.example_batch(2))
        if stage.kind == "evaluate":
            refresh_stage_log(out / "metrics.json", state.log)
    metrics = out / "metrics.json"
    report = out / "report.html"
    return RunResult(out, state, metrics if metrics.is_file() else None, report if report.is_file() else None)


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
