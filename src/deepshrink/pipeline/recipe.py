"""Recipe schema: a YAML file of stages, validated completely before anything runs.

    name: demo
    model: lenet-5                 # zoo name, path/to/file.py:ClassName, or a checkpoint
    data: {name: digits}
    target: xnnpack
    stages:
      - train: {epochs: 8}
      - prune: {method: magnitude, sparsity: 0.8}
      - finetune: {epochs: 3, lr: 0.0005}
      - quantize: {scheme: int8-static}
      - export: {formats: [pte, onnx]}
      - evaluate: {}
      - report: {}

Every stage's keys are the fields of its config dataclass; ``prune`` picks the class by
``method`` and ``quantize`` by ``scheme``. Validation is complete before anything runs: every
fault in the recipe is collected into one ``ConfigError``, each named by its key's path, e.g.
``stages[1].prune.sparsity: 1.5 is outside [0, 1)``, names checked against the registries (with
a suggestion for a near miss). The file itself is read strictly (``recipe_file``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deepshrink.core.config import check, did_you_mean, from_dict, short_repr, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.core.targets import TARGETS
from deepshrink.pipeline.recipe_checks import (
    check_model, check_user_data, checkpoint_problems, device_problems, objective_problems, order_problems, schedule_problems,
    seed_problems,
)
from deepshrink.core.loops import TrainConfig
from deepshrink.pruning import PRUNERS, SCHEDULES, ChannelPruning
from deepshrink.quantization import QUANTIZERS

# A prune stage's ``method:`` and a quantize stage's ``scheme:`` are the names their configs are
# registered under (``prune`` / ``quantize`` registries): a config registered with a name is in
# recipes at once. The schedules' names live beside them (``pruning.schedules.SCHEDULES``).


MAX_IMAGE_SIZE = 4096     # a side beyond this is a typo that would allocate gigabytes per batch


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int = 28
    calib_size: int = 256
    seed: int = 0
    # your own samples: path/to/file.py:NAME, each a function returning a list of samples (tensors,
    # tuples or dicts of tensors), or a (samples, labels) pair; with them ``name`` only labels the run
    calib: str | None = None
    eval: str | None = None
    train: str | None = None
    batch_dim: bool = False      # each sample carries a batch dimension of 1 (a tokenizer's return_tensors="pt")
    collate: str | None = None   # path/to/file.py:NAME batching a list of (inputs, label) pairs, e.g. with padding

    def __post_init__(self) -> None:
        from deepshrink.core.userfile import is_spec

        check(self.calib_size >= 1, "calib_size", f"{self.calib_size} must be >= 1")
        check(1 <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
              f"{self.image_size} is outside 1..{MAX_IMAGE_SIZE} (pixels per side, e.g. 28)")
        given = [k for k in ("calib", "eval", "train", "collate") if getattr(self, k) is not None]
        for key in given:
            check(is_spec(getattr(self, key)), key, f"{getattr(self, key)!r} is not path/to/file.py:NAME")
        if given:
            check(self.calib is not None and self.eval is not None, "calib" if self.calib is None else "eval",
                  "your own data needs both calib: and eval: (path/to/file.py:NAME each)")
        else:
            from deepshrink.data.sources import DATASETS

            check(self.name in DATASETS, "name", f"{self.name!r} is not a dataset; choose one of {', '.join(DATASETS)}, "
                  "or give calib: and eval: as path/to/file.py:NAME functions returning your samples"
                  + did_you_mean(self.name, DATASETS))

    @property
    def user_samples(self) -> bool:
        return self.calib is not None


@dataclass(frozen=True)
class LoadStage:
    checkpoint: str


@dataclass(frozen=True)
class ExportStage:
    """Which files to write (default: the target's own format). ``baseline``: also export the
    dense fp32 model for comparison. ``parity``: ``fail`` stops the run when a file's outputs in
    its runtime are beyond tolerance from the module's (``deploy.parity``); ``warn`` keeps the
    file and the report shows the failure in red. ``dynamic``: dimensions that vary besides the
    batch, per input (``forward`` argument name or position) — ``{input_ids: {1: [2, 128]}}``; the
    files then run every size in range and parity is checked on test samples of several sizes.
    ``static_batch``: batch fixed to 1, the whole graph one delegate call (the phone's case)."""

    formats: tuple[Literal["pte", "onnx", "dsk"], ...] | None = None
    baseline: bool = True
    parity_samples: int = 64
    parity: Literal["fail", "warn"] = "fail"
    dynamic: dict[str, dict[str, tuple[int, int]]] | None = None
    static_batch: bool = False

    def __post_init__(self) -> None:
        check(self.formats is None or len(self.formats) > 0, "formats", "give at least one of 'pte', 'onnx', 'dsk'")
        check(self.parity_samples >= 1, "parity_samples", f"{self.parity_samples} must be >= 1")
        # what needs the model (input names, ranks) is checked at export; the numbers are checked here
        for name, dims in (self.dynamic or {}).items():
            for dim, (lo, hi) in dims.items():
                check(dim.isdigit() and int(dim) >= 1, f"dynamic.{name}.{dim}",
                      "a dimension is a position >= 1 (0 is the batch, always dynamic), e.g. {input_ids: {1: [2, 128]}}")
                check(2 <= lo <= hi, f"dynamic.{name}.{dim}",
                      f"range [{lo}, {hi}] must satisfy 2 <= min <= max (torch.export specialises sizes 0 and 1)")


@dataclass(frozen=True)
class EvaluateStage:
    """Measure every variant. Latency: batch 1, ``threads`` fixed, runs interleaved across variants
    in ten rounds of ``latency_runs / 10`` calls of each (``core.timing.steady_block``).
    Every variant's fidelity to the fp32 model is measured in its runtime; ``fidelity`` overrides
    the figure chosen by the output kind (``classification`` | ``embedding`` | ``tensor``)."""

    threads: int = 1
    latency_runs: int = 200
    warmup: int = 20
    fidelity: Literal["classification", "embedding", "tensor"] | None = None
    metric: str | None = None    # path/to/file.py:NAME, fn(reference, produced) -> dict of extra figures

    def __post_init__(self) -> None:
        check(self.threads >= 1, "threads", f"{self.threads} must be >= 1")
        check(self.latency_runs >= 0, "latency_runs", f"{self.latency_runs} must be >= 0")
        check(self.warmup >= 0, "warmup", f"{self.warmup} must be >= 0")
        from deepshrink.core.userfile import is_spec

        check(self.metric is None or is_spec(self.metric), "metric", f"{self.metric!r} is not path/to/file.py:NAME")


@dataclass(frozen=True)
class SensitivityOptions:
    """Measure each layer's val accuracy when pruned alone at ``sparsities``, then prune with the
    per-layer sparsities that reach the stage's target (or stay within ``max_drop``, a fraction)
    at the least predicted loss."""

    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    max_drop: float | None = None

    def __post_init__(self) -> None:
        for i, value in enumerate(self.sparsities):
            check(0.0 < value < 1.0, f"sparsities[{i}]", f"{value} is outside (0, 1)")
        check(self.max_drop is None or self.max_drop >= 0, "max_drop", "must be >= 0 (e.g. 0.01 for one point)")


@dataclass(frozen=True)
class PruneStage:
    """A pruning config (chosen by ``method``), optionally on a schedule with retraining.

    Without ``schedule`` the prune is one-shot and a later ``finetune`` stage wins the accuracy
    back. With it (``{iterative: {sparsities: [0.5, 0.8]}}``, ``{gradual: {steps: 8}}``) the stage
    alternates prunes and ``retrain`` epochs itself; ``retrain.distill`` distils from the dense model.
    Without a schedule, ``retrain`` trains once after the one-shot prune, masks held.
    ``remove_dead: true`` then cuts out the units no remaining weight reads (exact; the model
    gets physically narrower, widths rounded up to the target's channel multiple).
    """

    pruning: Any
    schedule: Any = None
    retrain: TrainConfig | None = None
    sensitivity: SensitivityOptions | None = None
    remove_dead: bool = False


@dataclass(frozen=True)
class ReportStage:
    title: str | None = None


STAGES: dict[str, type | None] = {
    "train": TrainConfig,
    "load": LoadStage,
    "prune": None,      # chosen by ``method``
    "finetune": TrainConfig,
    "quantize": None,   # chosen by ``scheme``
    "export": ExportStage,
    "evaluate": EvaluateStage,
    "report": ReportStage,
}


@dataclass(frozen=True)
class Stage:
    kind: str
    config: Any
    device: str | None = None   # where a stage that trains trains: cpu | cuda | auto (None: the CPU)

    def as_dict(self) -> dict:
        body = to_dict(self.config)
        if self.kind == "prune":
            body = {"method": PRUNERS.name_of(self.config.pruning), **to_dict(self.config.pruning)}
            if self.config.schedule is not None:
                body["schedule"] = {_name_of(SCHEDULES, self.config.schedule): to_dict(self.config.schedule)}
            if self.config.retrain is not None:
                body["retrain"] = to_dict(self.config.retrain)
            if self.config.sensitivity is not None:
                body["sensitivity"] = to_dict(self.config.sensitivity)
            if self.config.remove_dead:
                body["remove_dead"] = True
        elif self.kind == "quantize":
            body = {"scheme": QUANTIZERS.name_of(self.config), **body}
        if self.device is not None:
            body["device"] = self.device
        return {self.kind: body}


@dataclass(frozen=True)
class Recipe:
    name: str = "recipe"
    model: str = "lenet-5"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    target: str = "xnnpack"
    seed: int = 0
    outputs: tuple[str, ...] | None = None   # the model's outputs to keep, by name or position ("logits", "0")
    # size: int8 everywhere; latency / balanced: per layer, int8 or fp32 by the target runtime's
    # measured times (deploy.objective) — latency never slower than fp32, balanced the smallest as fast
    objective: Literal["size", "latency", "balanced"] = "size"
    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        # the name becomes the output directory (out/<name>): it must stay one plain path component
        check(bool(self.name.strip()) and self.name not in (".", "..") and not re.search(r"[/\\\x00-\x1f]", self.name)
              and len(self.name) <= 128, "name",
              f"{short_repr(self.name)} is not a plain name (it names the output directory out/<name>); "
              "use letters, digits, '-', '_' or '.', e.g. lenet5-int8")

    def as_dict(self) -> dict:
        return {
            "name": self.name, "model": self.model, "model_args": dict(self.model_args), "data": to_dict(self.data),
            "target": self.target, "seed": self.seed, "stages": [s.as_dict() for s in self.stages],
            **({"objective": self.objective} if self.objective != "size" else {}),   # old fingerprints stay valid
        }

    def fingerprint(self) -> str:
        """Hash of the validated recipe: a resumed run must continue the same recipe (on any device:
        a run killed on a GPU machine may finish on a CPU one)."""
        body = self.as_dict()
        body["stages"] = [{kind: {k: v for k, v in options.items() if k != "device"}}
                          for stage in body["stages"] for kind, options in stage.items()]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _name_of(table: dict[str, type], config: object) -> str:
    return next(name for name, klass in table.items() if type(config) is klass)


def _collect(problems: list[str], fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or None with its faults appended to ``problems``."""
    try:
        return fn(*args)
    except ConfigError as err:
        problems.extend(err.problems or (str(err),))
        return None


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(*problems)


def _pick(table: dict[str, type], key: str, body: dict, path: str) -> tuple[type, dict]:
    body = dict(body)
    choice = body.pop(key, None)
    if choice is None:
        raise ConfigError(f"{path}.{key}: required; choose one of {', '.join(map(repr, table))}")
    if not isinstance(choice, str) or choice not in table:
        raise ConfigError(f"{path}.{key}: {short_repr(choice)} is not allowed; choose one of {', '.join(map(repr, table))}"
                          + did_you_mean(choice, table))
    return table[choice], body


def _kind_of(item: Any) -> str | None:
    if isinstance(item, dict) and len(item) == 1:
        kind = next(iter(item))
        return kind if isinstance(kind, str) and kind in STAGES else None
    return None


def parse_stage(item: Any, path: str) -> Stage:
    """One stage; ``device:`` (a stage that trains) is read here, the rest by the stage's config."""
    body = next(iter(item.values())) if isinstance(item, dict) and len(item) == 1 else None
    if not isinstance(body, dict) or "device" not in body:
        return _parse_config(item, path)
    kind = next(iter(item))
    options = dict(body)
    device = options.pop("device")
    problems = device_problems(kind, device, f"{path}.{kind}") if kind in STAGES else []
    stage = _collect(problems, _parse_config, {kind: options}, path)
    _raise_if(problems)
    return Stage(stage.kind, stage.config, device)


def _parse_config(item: Any, path: str) -> Stage:
    if not isinstance(item, dict) or len(item) != 1:
        raise ConfigError(f"{path}: a stage is a mapping with one key, one of {', '.join(STAGES)}; got {short_repr(item)}")
    kind, body = next(iter(item.items()))
    if _kind_of(item) is None:
        raise ConfigError(f"{path}.{kind}: unknown stage; allowed stages: {', '.join(STAGES)}" + did_you_mean(kind, STAGES))
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ConfigError(f"{path}.{kind}: expected a mapping of options, got {short_repr(body)}")
    stage_path = f"{path}.{kind}"
    if kind == "prune":
        return Stage(kind, parse_prune(body, stage_path))
    elif kind == "quantize":
        klass, body = _pick(QUANTIZERS.names(), "scheme", body, stage_path)
    else:
        klass = STAGES[kind]
    return Stage(kind, from_dict(klass, body, stage_path))


def parse_prune(body: dict, path: str) -> PruneStage:
    """Every fault of a prune stage at once: method, criterion options, schedule, retrain, sensitivity."""
    body, problems = dict(body), []
    schedule_raw, retrain_raw = body.pop("schedule", None), body.pop("retrain", None)
    sensitivity_raw = body.pop("sensitivity", None)
    remove_dead = body.pop("remove_dead", False)
    if not isinstance(remove_dead, bool):
        problems.append(f"{path}.remove_dead: expected true or false, got {short_repr(remove_dead)}")
    picked = _collect(problems, _pick, PRUNERS.names(), "method", body, path)
    pruning = None if picked is None else _collect(problems, from_dict, picked[0], picked[1], path)
    schedule = None
    if schedule_raw is not None:
        if not isinstance(schedule_raw, dict) or len(schedule_raw) != 1:
            problems.append(f"{path}.schedule: a mapping with one key, one of {', '.join(SCHEDULES)}; got {short_repr(schedule_raw)}")
        else:
            name, options = next(iter(schedule_raw.items()))
            if not isinstance(name, str) or name not in SCHEDULES:
                problems.append(f"{path}.schedule.{name}: unknown schedule; choose one of {', '.join(SCHEDULES)}"
                                + did_you_mean(name, SCHEDULES))
            else:
                schedule = _collect(problems, from_dict, SCHEDULES[name], options or {}, f"{path}.schedule.{name}")
    retrain = None if retrain_raw is None else _collect(problems, from_dict, TrainConfig, retrain_raw, f"{path}.retrain")
    sensitivity = None if sensitivity_raw is None else _collect(
        problems, from_dict, SensitivityOptions, sensitivity_raw, f"{path}.sensitivity")
    if picked is not None and picked[0] is ChannelPruning and (schedule_raw is not None or sensitivity_raw is not None or remove_dead):
        problems.append(f"{path}: method 'channels' prunes in its own `steps` (with `retrain` between) and "
                        "leaves no dead channel; remove schedule/sensitivity/remove_dead")
    elif isinstance(pruning, ChannelPruning) and pruning.train is not None and retrain_raw is not None:
        problems.append(f"{path}.retrain: method 'channels' trains between its steps with `train` or `retrain`; "
                        "give one of them")
    elif schedule_raw is not None and retrain_raw is None:
        problems.append(f"{path}.retrain: a schedule needs retrain epochs between prunes, e.g. retrain: {{epochs: 10, lr: 0.0005}}")
    elif pruning is not None and schedule is not None and retrain is not None:
        problems += schedule_problems(pruning, schedule, retrain, path)
    if sensitivity is not None and pruning is not None and pruning.sparsity is None:
        problems.append(f"{path}.sensitivity: needs a sparsity to share among layers; without one the criterion "
                        "learns each layer's sparsity itself: remove sensitivity, or set a sparsity")
    if sensitivity is not None and pruning is not None and pruning.overrides:
        problems.append(f"{path}.sensitivity: proposes per-layer sparsities itself; remove overrides or sensitivity")
    _raise_if(problems)
    return PruneStage(pruning, schedule, retrain, sensitivity, remove_dead)


def parse_recipe(raw: Any) -> Recipe:
    """Validate plain data (as loaded from YAML) into a ``Recipe``; every fault is reported at once."""
    if raw is None:
        raise ConfigError("recipe: the file is empty; a recipe is a mapping with keys name, model, data, target, stages")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe: expected a mapping with keys name, model, data, target, stages; got {type(raw).__name__}")
    raw, problems = dict(raw), []
    stages_raw = raw.pop("stages", None)
    recipe = _collect(problems, from_dict, Recipe, raw, "recipe")
    # names are checked on the raw values, so a fault elsewhere in the top level hides none of them
    target, model = raw.get("target", Recipe.target), raw.get("model", Recipe.model)
    if isinstance(target, str) and target not in TARGETS:
        problems.append(f"target: {short_repr(target)} is not allowed; choose one of {', '.join(map(repr, TARGETS))}"
                        + did_you_mean(target, TARGETS))
    if isinstance(model, str):
        _collect(problems, check_model, model)
    if not isinstance(stages_raw, list) or not stages_raw:
        got = "" if stages_raw is None or stages_raw == [] else f"; got {short_repr(stages_raw)}"
        problems.append(f"stages: required, a non-empty list of stages such as '- train: {{epochs: 5}}'{got}")
        stages_raw = []
    stages = [_collect(problems, parse_stage, item, f"stages[{i}]") for i, item in enumerate(stages_raw)]
    problems += order_problems([_kind_of(item) for item in stages_raw])
    problems += [p for i, stage in enumerate(stages) if stage is not None and stage.kind == "load"
                 for p in checkpoint_problems(f"stages[{i}].load", stage.config.checkpoint)]
    if recipe is not None:
        problems += seed_problems(recipe, stages)
        problems += objective_problems(recipe, stages)
        if recipe.data.user_samples and not problems:   # imports the user's files: only for an otherwise sound recipe
            _collect(problems, check_user_data, recipe.data)
    _raise_if(problems)
    return Recipe(**{**{k: getattr(recipe, k) for k in ("name", "model", "model_args", "data", "target", "seed", "outputs", "objective")},
                     "stages": tuple(stages)})


def load_recipe(source: str | os.PathLike | dict) -> Recipe:
    """Read (strictly: ``recipe_file``) and validate a recipe from a YAML file, or from plain data."""
    if isinstance(source, dict):
        return parse_recipe(source)
    from deepshrink.pipeline.recipe_file import load_yaml

    path = Path(source)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "does not exist"
        raise ConfigError(f"recipe: file {path} {what}")
    return parse_recipe(load_yaml(path))


def packaged_recipe(name: str) -> Path:
    return Path(__file__).with_name("recipes") / f"{name}.yaml"
