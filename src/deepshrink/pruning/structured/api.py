"""``prune(model, ChannelPruning(...))``: analyse, score, choose widths, shrink — optionally in steps.

The four stages stay separate functions so each can be used alone: ``analyze_channels``
(dependency graph), a criterion from ``importance`` (scores), ``widths`` (how many stay, which)
and ``shrink_channels`` (new, smaller modules). ``mask_channels`` applies the same plan as zeros,
the reference a shrunk model must match.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from deepshrink.core.counting import count_macs
from deepshrink.core.errors import ConfigError, DeepshrinkError
from deepshrink.core.loops import TrainConfig, TrainFn, run_training
from deepshrink.core.masks import has_masks
from deepshrink.core.selection import first_match, select, weighted_layers
from deepshrink.core.targets import get_target
from deepshrink.data.splits import DataSplits
from deepshrink.pruning.api import PRUNERS, PruneCall
from deepshrink.pruning.structured.arch import record_widths
from deepshrink.pruning.structured.configs import ChannelPruning
from deepshrink.pruning.structured.dependency import analyze_channels, describe_unsupported
from deepshrink.pruning.structured.graph import ChannelGraph, ChannelGroup
from deepshrink.pruning.structured.importance import bn_scale_scores, magnitude_scores, taylor_scores, train_batches
from deepshrink.pruning.structured.shrink import ChannelPlan, shrink_channels
from deepshrink.pruning.structured.widths import global_counts, local_counts, top_channels


class ShrinkError(DeepshrinkError, RuntimeError):
    """The shrunk model does not run: a coupling the analysis missed (a bug to report)."""


@dataclass
class StructuredReport:
    """What a ``ChannelPruning`` changed. ``layers``: every Conv/Linear, output channels (before,
    after); ``groups``: each channel group, its producers and widths; ``unpruned``: what the
    analysis left alone and why; ``arch``: the rebuilt constructor record (None: save as .pt2)."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    macs_before: int | None = None
    macs_after: int | None = None
    groups: list[dict] = field(default_factory=list)
    unpruned: list[str] = field(default_factory=list)
    channel_multiple: int = 1
    arch: dict | None = None
    steps: list[dict] = field(default_factory=list)

    @property
    def macs_reduction(self) -> float | None:
        """MACs before / after (4.0 = four times fewer)."""
        if not self.macs_before or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    def as_dict(self) -> dict:
        return {**asdict(self), "layers": {n: {"before": b, "after": a} for n, (b, a) in self.layers.items()},
                "macs_reduction": self.macs_reduction}


@PRUNERS.register(ChannelPruning, name="channels")
def _channels(model: nn.Module, config: ChannelPruning, call: PruneCall) -> StructuredReport:
    example = call.example_input
    if example is None:
        if call.data is None:
            raise ConfigError("ChannelPruning traces the model: pass example_input= (a batch of real inputs) or data=")
        example = call.data.example_batch(8)
    return shrink_model(model, config, example_input=example, data=call.data, target=call.target,
                        train_fn=call.train_fn, teacher=call.teacher)


def shrink_model(
    model: nn.Module,
    config: ChannelPruning,
    *,
    example_input: torch.Tensor,
    data: DataSplits | None = None,
    target: str = "xnnpack",
    train_fn: TrainFn | None = None,
    teacher: nn.Module | None = None,
) -> StructuredReport:
    """Remove output channels from ``model``'s layers in place; the model ends physically smaller.

    ``example_input``: a batch of real inputs to trace with (and count MACs on). ``data``: needed
    for ``importance="taylor"`` and for ``steps > 1``. ``target``: its ``channel_multiple`` is the
    width multiple unless ``config.round_to`` is set. ``train_fn`` (``core.loops``) and ``teacher``:
    the fine-tuning between steps, ``config.train``, when ``config.steps > 1`` (with distillation
    from ``teacher`` when ``train.distill`` is set); the last step is not fine-tuned here.
    """
    if not isinstance(config, ChannelPruning):
        raise ConfigError(f"prune: expected a ChannelPruning config, got {type(config).__name__}")
    if has_masks(model):
        raise ConfigError("ChannelPruning: the model carries unstructured pruning masks; call deepshrink.finalize(model) first")
    if config.steps > 1 and (data is None or config.train is None):
        raise ConfigError(f"ChannelPruning.steps: {config.steps} steps fine-tune between steps; pass data= and set "
                          f"train: (a TrainConfig, e.g. {{epochs: 2}}), or use steps: 1")
    if config.steps > 1 and train_fn is None:
        run_training(None, model, data, config.train, who="ChannelPruning.steps")   # raises, naming the fix
    multiple = config.round_to or get_target(target).channel_multiple
    widths_before = _layer_widths(model)
    report = StructuredReport(macs_before=_macs(model, example_input), channel_multiple=multiple)
    reference: dict[tuple, int] = {}
    for step in range(1, config.steps + 1):
        graph = analyze_channels(model, example_input, warn=step == 1)
        if step == 1:
            report.unpruned = describe_unsupported(graph)
        groups = graph.groups(_excluded(graph, config))
        for group in groups:
            reference.setdefault(_signature(group), group.size)
        fraction = step / config.steps
        scores = _scores(model, graph, groups, config, data)
        counts = _counts(groups, scores, config, fraction, multiple, [reference.get(_signature(g), g.size) for g in groups])
        plan = ChannelPlan.from_keep(graph, groups, [top_channels(s, k) for s, k in zip(scores, counts)])
        shrink_channels(model, plan)
        _check_runs(model, example_input)
        entry = {
            "step": step, "ratio": config.ratio * fraction, "macs": _macs(model, example_input),
            "groups": [{"layers": list(g.layers), "before": g.size, "after": k} for g, k in zip(groups, counts)],
        }
        if step < config.steps:
            history = run_training(train_fn, model, data, config.train, who="ChannelPruning.steps", teacher=teacher)
            accuracies = getattr(history, "val_accuracy", None)
            entry["val_accuracy"] = max(accuracies) if accuracies else None
        report.steps.append(entry)
    first, last = report.steps[0]["groups"], {tuple(g["layers"]): g["after"] for g in report.steps[-1]["groups"]}
    report.groups = [{"layers": g["layers"], "before": g["before"], "after": last.get(tuple(g["layers"]), g["after"])} for g in first]
    widths_after = _layer_widths(model)
    report.layers = {n: (b, widths_after[n]) for n, b in widths_before.items() if n in widths_after}
    report.macs_after = _macs(model, example_input)
    report.arch = record_widths(model)
    return report


def prune_channels(
    model: nn.Module,
    config: ChannelPruning,
    *,
    example_input: torch.Tensor,
    data: DataSplits | None = None,
    target: str = "xnnpack",
    train_config: TrainConfig | None = None,
    teacher: nn.Module | None = None,
    progress: bool | None = False,
    train_fn: TrainFn | None = None,
) -> StructuredReport:
    """Deprecated: ``prune(model, ChannelPruning(..., train=train_config), example_input=..., data=...,
    train_fn=...)``, then ``prune_report(model)``. ``deepshrink.prune`` passes
    ``deepshrink.training.fit`` as the loop; here, without ``train_fn``, ``steps > 1`` fails."""
    warnings.warn("prune_channels is deprecated and will be removed in the next release: use "
                  "deepshrink.prune(model, ChannelPruning(...), example_input=...)", DeprecationWarning, stacklevel=2)
    if isinstance(config, ChannelPruning) and config.steps > 1 and (data is None or (train_config is None and config.train is None)):
        raise ConfigError(f"ChannelPruning.steps: {config.steps} steps fine-tune between steps; pass data= and train_config= "
                          f"(a TrainConfig), or use steps: 1")
    if train_config is not None and isinstance(config, ChannelPruning):
        config = replace(config, train=train_config)
    return shrink_model(model, config, example_input=example_input, data=data, target=target, train_fn=train_fn,
                        teacher=teacher)


def _signature(group: ChannelGroup) -> tuple:
    return group.layers, group.multiplicity


def _excluded(graph: ChannelGraph, config: ChannelPruning) -> set[str]:
    """Producers whose channels must stay (not in ``layers``, or in ``skip``); typos are errors."""
    names = list(graph.producers)
    excluded: set[str] = set()
    if config.layers:
        excluded |= set(names) - set(select(names, config.layers, what="ChannelPruning.layers"))
    if config.skip:
        excluded |= set(select(names, config.skip, what="ChannelPruning.skip"))
    if config.overrides:
        select(names, config.overrides, what="ChannelPruning.overrides")
    return excluded


def _scores(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup], config: ChannelPruning, data) -> list[torch.Tensor]:
    if not groups:
        return []
    if config.importance in ("l1", "l2"):
        return magnitude_scores(model, graph, groups, config.importance)
    if config.importance == "bn_scale":
        return bn_scale_scores(model, graph, groups)
    batches = train_batches(data, batches=config.batches, batch_size=config.batch_size, seed=config.seed)
    return taylor_scores(model, graph, groups, batches)


def _override(group: ChannelGroup, overrides: dict[str, float]) -> float | None:
    for layer in group.layers:
        ratio = first_match(layer, overrides, None)
        if ratio is not None:
            return ratio
    return None


def _counts(groups, scores, config: ChannelPruning, fraction: float, multiple: int, reference: list[int]) -> list[int]:
    """Channels each group keeps at ``fraction`` of the way to the final ratios."""
    overrides = [_override(g, config.overrides) for g in groups]
    sizes = [g.size for g in groups]
    counts = local_counts(sizes, [fraction * (config.ratio if o is None else o) for o in overrides], multiple, reference=reference)
    if config.scope == "global":
        free = [i for i, o in enumerate(overrides) if o is None]
        ranked = global_counts([scores[i] for i in free], fraction * config.ratio, multiple, reference=[reference[i] for i in free])
        for i, count in zip(free, ranked):
            counts[i] = count
    return counts


def _layer_widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels) for n, m in weighted_layers(model).items()}


@torch.no_grad()
def _macs(model: nn.Module, example_input: torch.Tensor) -> int | None:
    was_training = model.training
    model.eval()  # batch-norm must not update its statistics on the counting pass
    try:
        return count_macs(model, example_input)
    finally:
        model.train(was_training)


@torch.no_grad()
def _check_runs(model: nn.Module, example_input: torch.Tensor) -> None:
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    except Exception as err:
        raise ShrinkError(f"ChannelPruning: the shrunk {type(model).__name__} no longer runs ({type(err).__name__}: {err}); "
                          f"this is a dependency-analysis bug, please report it with the model") from err
    finally:
        model.train(was_training)
