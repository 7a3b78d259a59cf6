"""One handler per recipe stage: ``(state, config, ctx) -> summary``. Each calls the public verbs."""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Callable

from deepshrink.core.masks import get_masks
from deepshrink.deploy import export
from deepshrink.evaluation.compare import evaluate_many
from deepshrink.evaluation.counting import count_macs
from deepshrink.formats.sidecar import read_sidecar
from deepshrink.models import load as load_model
from deepshrink.models.loading import load_checkpoint
from deepshrink.pipeline.metrics_doc import build_metrics, write_metrics
from deepshrink.pipeline.recipe import EvaluateStage, ExportStage, LoadStage, PruneStage, Recipe, ReportStage
from deepshrink.pipeline.state import RunState
from deepshrink.pruning import (ChannelPruning, ScheduledPruning, finalize, layer_sensitivity, predicted_drop,
                                propose_sparsities, prune, prune_report)
from deepshrink.pruning.structured.dead import remove_dead_channels
from deepshrink.quantization import quantize
from deepshrink.quantization.lowbit import quantized_weights
from deepshrink.quantization.mixed_precision import mixed_precision_line
from deepshrink.training import TrainConfig, accuracy, fit

FP32, COMPRESSED = "fp32", "compressed"


def initial_model(recipe: Recipe):
    model = load_model(recipe.model, **recipe.model_args)
    if recipe.outputs:
        from deepshrink.models.loading import select_outputs

        model = select_outputs(model, list(recipe.outputs))
    return model


def _score_name(ctx, state: RunState) -> str:
    """What ``_test_accuracy`` measures: with labels accuracy, without them agreement with fp32 —
    top-1 of a classifier's scores, cosine similarity of any other output (``training.accuracy``)."""
    if ctx.data.labelled:
        return "test accuracy"
    import torch

    from deepshrink.core import samples as S
    from deepshrink.core.outputs import output_kind, primary

    with torch.no_grad():
        first = primary(S.call(state.baseline if state.baseline is not None else state.model, ctx.example_batch(2)))
    return "top-1 agreement with fp32" if output_kind(first) == "classification" else "cosine similarity with fp32"


def _test_accuracy(model, ctx, state: RunState | None = None) -> float:
    """Test accuracy with labels; without, agreement with the fp32 baseline (fidelity, ``_score_name``).
    Rank 0's alone in a distributed run (the others' summaries are not kept): NaN on the others."""
    from deepshrink.training.distributed import is_main

    if not is_main():
        return float("nan")
    reference = state.baseline if state is not None and state.baseline is not None else model
    return accuracy(model, ctx.data.loader("test", batch_size=512), reference=reference)


def _baseline(state: RunState, ctx) -> None:
    """Keep the dense fp32 model as the reference every compressed variant is compared with."""
    if state.baseline is None:
        state.snapshot_baseline()
        try:
            state.baseline_macs = count_macs(state.baseline, ctx.example_batch(1))
        except (RuntimeError, TypeError, ValueError, IndexError) as err:   # the model cannot take the data's samples
            raise _does_not_fit(state.model, ctx, err) from None


def check_fits(model, ctx) -> None:
    """One forward of a real sample before the first stage: a model that cannot take the data (or
    whose code calls ``sys.exit``) fails here in one line, not inside a stage minutes into training."""
    import torch

    from deepshrink.core import samples as S
    from deepshrink.core.errors import ModelLoadError

    training = model.training
    try:
        model.eval()
    except NotImplementedError:   # an exported program's module has no train/eval switch
        pass
    try:
        with torch.no_grad():
            S.call(model, ctx.example_batch(2))
    except (RuntimeError, TypeError, IndexError) as err:   # what torch raises for shapes that do not fit
        raise _does_not_fit(model, ctx, err) from None
    except SystemExit as err:   # the user's code must not end the run without a word
        raise ModelLoadError(f"model: {type(model).__name__}.forward called sys.exit({err.code!r}) on a sample of "
                             f"{ctx.data.name}; a model must raise an exception instead") from None
    finally:
        try:
            model.train(training)
        except NotImplementedError:
            pass


def _does_not_fit(model, ctx, err: BaseException):
    from deepshrink.core import samples as S
    from deepshrink.core.errors import DataError

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"model and data do not fit: {type(model).__name__} cannot run a sample of "
                     f"{ctx.data.name} ({S.describe(ctx.data.test[0][0])}, shapes {list(S.shapes(ctx.data.test[0][0]))}): "
                     f"{type(err).__name__}: {first}")


def _teacher(state: RunState, config: TrainConfig | None):
    """The dense baseline when ``config`` distils, else None."""
    return state.baseline if config is not None and config.distill is not None else None


def _train_fn(ctx, state: RunState):
    """The loop the transforms that train are handed: ``fit`` (they never import it themselves);
    on raw inputs without labels it distils from the original model, whoever calls it."""
    def train(model, data, config, *, teacher=None, **kwargs):
        return fit(model, data, config, teacher=_label_free_teacher(state, ctx, teacher), progress=ctx.progress, **kwargs)

    return train


def _label_free_teacher(state: RunState, ctx, teacher):
    """``teacher``, or on raw inputs only the dense baseline: there is nothing else to learn from."""
    return state.baseline if teacher is None and not ctx.data.labelled else teacher


def _fit_resumable(state: RunState, config: TrainConfig, ctx, name: str, teacher=None):
    """``fit`` with per-epoch state in ``<out>/state/<name>-epoch.pt``, removed once the training ends."""
    epoch_file = ctx.out_dir / "state" / f"{name}-epoch.pt"
    teacher = _label_free_teacher(state, ctx, teacher)
    history = fit(state.model, ctx.data, config, teacher=teacher, progress=ctx.progress, resume_path=epoch_file)
    epoch_file.unlink(missing_ok=True)
    return history


def _train(state: RunState, config: TrainConfig, ctx) -> dict:
    history = _fit_resumable(state, config, ctx, "train")
    state.baseline = None
    _baseline(state, ctx)
    acc = _test_accuracy(state.model, ctx, state)
    return {"val_accuracy": history.val_accuracy, "best_epoch": history.best_epoch, "test_accuracy": acc,
            "line": f"{_score_name(ctx, state)} {acc:.2%} (eager fp32)"}


def _load(state: RunState, config: LoadStage, ctx) -> dict:
    from deepshrink.core.userfile import is_spec

    state.model = load_checkpoint(config.checkpoint, code=ctx.recipe.model if is_spec(ctx.recipe.model) else None)
    state.baseline = None
    _baseline(state, ctx)
    acc = _test_accuracy(state.model, ctx, state)
    return {"checkpoint": config.checkpoint, "test_accuracy": acc, "line": f"{_score_name(ctx, state)} {acc:.2%}"}


def _sensitivity(state: RunState, stage: PruneStage, data, ctx) -> tuple[object, dict]:
    """The pruning config with per-layer sparsities proposed from measured sensitivity curves."""
    import dataclasses

    options = stage.sensitivity
    curves = layer_sensitivity(state.model, data, tuple(options.sparsities), criterion=stage.pruning,
                               accuracy_fn=accuracy, train_fn=_train_fn(ctx, state))
    if options.max_drop is not None:
        proposal = propose_sparsities(curves, max_drop=options.max_drop)
    else:
        proposal = propose_sparsities(curves, target_sparsity=stage.pruning.sparsity)
    config = dataclasses.replace(stage.pruning, overrides={name: round(s, 6) for name, s in proposal.items()})
    return config, {"curves": curves.as_dict(), "proposed": proposal, "predicted_drop": predicted_drop(curves, proposal)}


def _prune_channels(state: RunState, stage: PruneStage, ctx) -> dict:
    config = stage.pruning if stage.retrain is None else replace(stage.pruning, train=stage.retrain)
    prune(state.model, config, example_input=ctx.example_batch(8), data=ctx.data, target=ctx.target.name,
          train_fn=_train_fn(ctx, state), teacher=_teacher(state, config.train))
    report = prune_report(state.model)
    acc = _test_accuracy(state.model, ctx, state)
    layers = {name: {"kept": after, "total": before} for name, (before, after) in report.layers.items()}
    return {"structured": report.as_dict(), "layers": layers, "test_accuracy": acc,
            "line": f"MACs {report.macs_before:,} -> {report.macs_after:,} ({report.macs_reduction:.2f}x fewer), "
                    f"{_score_name(ctx, state)} {acc:.2%}"}


def _prune(state: RunState, stage: PruneStage, ctx) -> dict:
    _baseline(state, ctx)
    if isinstance(stage.pruning, ChannelPruning):
        return _prune_channels(state, stage, ctx)
    summary = _prune_unstructured(state, stage, ctx)
    if stage.remove_dead:
        changed = remove_dead_channels(state.model, ctx.example_batch(8), multiple=ctx.target.channel_multiple)
        widths = ", ".join(f"{name} {before}->{after}" for name, (before, after) in changed.items()) or "none"
        summary["removed_dead"] = {name: {"before": b, "after": a} for name, (b, a) in changed.items()}
        summary["line"] += f"; dead units removed: {widths}"
    return summary


def _prune_unstructured(state: RunState, stage: PruneStage, ctx) -> dict:
    config, extra = stage.pruning, {}
    if stage.sensitivity is not None:
        config, extra = _sensitivity(state, stage, ctx.data, ctx)
        extra = {"sensitivity": extra}
    teacher = _teacher(state, stage.retrain)
    if stage.schedule is None:
        report = prune_report(prune(state.model, config, data=ctx.data, train_fn=_train_fn(ctx, state)))
        acc = _test_accuracy(state.model, ctx, state)
        what = report.describe() if hasattr(report, "describe") else f"sparsity {report.sparsity:.1%} of pruned layers"
        line = f"{what}, {_score_name(ctx, state)} {acc:.2%}"
        if stage.retrain is None:
            return {**report.as_dict(), **extra, "test_accuracy_before_finetune": acc, "line": f"{line} before fine-tuning"}
        # one-shot prune, then the stage's own retraining with the masks held
        history = _fit_resumable(state, stage.retrain, ctx, "retrain", teacher)
        after = _test_accuracy(state.model, ctx, state)
        return {**report.as_dict(), **extra, "test_accuracy_before_finetune": acc, "test_accuracy": after,
                "retrain": {"val_accuracy": history.val_accuracy, "best_epoch": history.best_epoch},
                "line": f"{line} after pruning, {after:.2%} after {len(history.val_accuracy)} retrain epochs"}
    scheduled = ScheduledPruning(config, stage.schedule, stage.retrain)
    steps = prune_report(prune(state.model, scheduled, data=ctx.data, train_fn=_train_fn(ctx, state), teacher=teacher)).steps
    report = next(s.report for s in reversed(steps) if s.report is not None)
    acc = _test_accuracy(state.model, ctx, state)
    rounds = [{"epoch": s.epoch, "sparsity": s.sparsity, "val_accuracy": list(getattr(s.history, "val_accuracy", None) or [])}
              for s in steps]
    return {**report.as_dict(), **extra, "rounds": rounds, "test_accuracy": acc,
            "line": f"sparsity {report.sparsity:.1%} of pruned layers after {len(rounds)} rounds, {_score_name(ctx, state)} {acc:.2%}"}


def _finetune(state: RunState, config: TrainConfig, ctx) -> dict:
    _baseline(state, ctx)
    history = _fit_resumable(state, config, ctx, "finetune", _teacher(state, config))
    acc = _test_accuracy(state.model, ctx, state)
    return {"val_accuracy": history.val_accuracy, "best_epoch": history.best_epoch, "test_accuracy": acc,
            "masks_kept": bool(get_masks(state.model)), "line": f"{_score_name(ctx, state)} {acc:.2%}"}


def _export_formats(ctx) -> tuple[str, ...]:
    """Every runtime format the recipe's export stages will write."""
    formats: list[str] = []
    for stage in ctx.recipe.stages:
        if stage.kind == "export":
            formats += [f for f in stage.config.formats or (ctx.target.export_format,) if f != "dsk"]
    return tuple(dict.fromkeys(formats))


def _with_int8_layout(config, ctx):
    """``config`` with its int8 layout resolved for every runtime the recipe exports to, when it
    leaves the layout to the target (``int8_layout: null``), and the reason, for the log."""
    import dataclasses

    from deepshrink.core.targets import common_int8_layout

    formats = _export_formats(ctx)
    layout = common_int8_layout(formats, ctx.target)
    reason = f"int8 layout {layout} (for {' and '.join('.' + f for f in formats) or 'the target'})"
    if hasattr(config, "ptq") and hasattr(config, "qat"):   # the budget loop nests both schemes
        inner = {k: getattr(config, k) for k in ("ptq", "qat")}
        if all(c.int8_layout is not None for c in inner.values()):
            return config, None
        return dataclasses.replace(config, **{k: dataclasses.replace(c, int8_layout=c.int8_layout or layout)
                                              for k, c in inner.items()}), reason
    if not hasattr(config, "int8_layout") or config.int8_layout is not None:   # low-bit schemes have no layout
        return config, None
    return dataclasses.replace(config, int8_layout=layout), reason


def _quantize(state: RunState, config, ctx) -> dict:
    _baseline(state, ctx)
    finalize(state.model)
    config, reason = _with_int8_layout(config, ctx)
    if reason:
        ctx.log(f"      {reason}")
    float_macs = count_macs(state.model, ctx.example_batch(1))  # the summary's; the graph counts the same itself
    def run(model, chosen_config):
        return quantize(model, chosen_config, data=ctx.data, target=ctx.target, train_fn=_train_fn(ctx, state),
                        accuracy_fn=accuracy)

    from deepshrink.quantization import Int8Dynamic, Int8Static

    objective = None
    if ctx.recipe.objective == "size" or not isinstance(config, (Int8Static, Int8Dynamic)):   # the others: recipe_checks
        state.model = run(state.model, config)
    else:
        from deepshrink.deploy.objective import choose_by_latency

        state.model, objective = choose_by_latency(state.model, config, run, example_input=ctx.example_batch(8),
                                                   target=ctx.target, objective=ctx.recipe.objective, log=ctx.log)
    state.quantization = {**(getattr(state.model, "_deepshrink_quant", None) or {"scheme": "none (fp32 was faster)"}),
                          "macs": float_macs, **({"objective": objective} if objective else {})}
    for line in state.quantization.get("budget_steps", []):
        ctx.log(f"      budget: {line}")
    guard = state.quantization.get("weight_range")
    if guard and guard.get("narrowed"):
        from deepshrink.quantization.weight_range import weight_range_line

        ctx.log(f"      {weight_range_line(guard)}")
    mixed = state.quantization.get("mixed_precision")
    if mixed:
        ctx.log(f"      mixed precision: {mixed_precision_line(mixed)}")
    acc = _test_accuracy(state.model, ctx, state)
    lowbit = quantized_weights(state.model)
    if lowbit:
        state.quantization["weights"] = {name: f"{type(qw).__name__} {qw.bits}-bit" for name, qw in lowbit.items()}
    return {**state.quantization, "simulated_test_accuracy": acc,
            "line": f"simulated (PyTorch) {_score_name(ctx, state)} {acc:.2%}"}


def _export(state: RunState, config: ExportStage, ctx) -> dict:
    finalize(state.model)
    example = ctx.example_batch(config.parity_samples)
    # real test samples, of every shape among the first ones when shapes vary
    parity_samples = ctx.data.inputs("test", config.parity_samples)
    dynamic = ctx.data.dynamic
    jobs = [(COMPRESSED, state.model)]   # every module counts its own MACs, quantized graphs too
    if config.baseline and state.baseline is not None:
        jobs.insert(0, (FP32, state.baseline))
    lines = []
    for role, module in jobs:
        for fmt in config.formats or (ctx.target.export_format,):
            path = ctx.out_dir / f"{role}.{fmt}"
            result = export(module, path, example_input=example, target=ctx.target, parity=config.parity,
                            parity_samples=parity_samples, dynamic=dynamic, static_batch=config.static_batch)
            sidecar = read_sidecar(path) or {}
            state.exports[f"{role} .{fmt}"] = {
                "path": str(path), "role": role, "format": fmt, "file_bytes": result.file_bytes,
                "parity_max_abs_diff": result.parity_max_abs_diff, "parity_argmax_agreement": result.parity_argmax_agreement,
                "parity": [p.as_dict() for p in result.parity], "parity_passed": result.parity_passed,
                "sparse_compute": sidecar.get("sparse_compute"), "delegation": sidecar.get("delegation"),
            }
            outside = (sidecar.get("delegation") or {}).get("outside_delegate")
            if outside:
                ctx.log(f"      {path.name}: ran outside XNNPACK (portable kernels, each splits the delegate): "
                        + ", ".join(f"{op} x{n}" for op, n in sorted(outside.items()))
                        + ("" if config.static_batch else "; a dynamic batch keeps some ops out: try static_batch: true"))
            flag = "" if result.parity_passed else " PARITY FAILED (kept: parity: warn)"
            lines.append(f"{path.name} {result.file_bytes / 1024:.0f} KiB{flag}")
            if not result.parity_passed:
                ctx.log(f"      {path.name}: parity beyond tolerance: "
                        + "; ".join(f"{p.runtime}: {', '.join(p.failures)}" for p in result.parity if not p.passed))
    return {"exports": state.exports, "line": ", ".join(lines)}


def _evaluate(state: RunState, config: EvaluateStage, ctx) -> dict:
    artifacts: dict[str, object] = {}
    if state.baseline is not None:
        artifacts[f"{FP32} eager"] = state.baseline
    if state.baseline is None or state.model is not state.baseline:
        artifacts[f"{COMPRESSED} eager" + (" (simulated quantized)" if state.quantization else "")] = state.model
    artifacts.update({label: info["path"] for label, info in state.exports.items()})
    measured = evaluate_many(artifacts, ctx.data.test, threads=config.threads, latency_runs=config.latency_runs,
                             reference=state.baseline, fidelity=config.fidelity, warmup=config.warmup,
                             metric=_user_metric(config.metric))
    state.variants = {label: {**m.as_dict(), **_role(label, state)} for label, m in measured.items()}
    document = build_metrics(state, ctx, config)
    from deepshrink.training.distributed import world

    # processes of this run; each training stage records its own under stages[i].training
    document["environment"]["world_size"] = world().size
    write_metrics(ctx.out_dir / "metrics.json", document)
    lines = [f"{label}: {_headline(m)}" for label, m in measured.items()]
    if document["shipped"]:
        lines.append(f"shipped: {document['shipped']['variant']} ({document['shipped']['why']})")
    return {"variants": list(state.variants), "checks": document["checks"], "shipped": document["shipped"],
            "line": "; ".join(lines)}


def _user_metric(spec: str | None):
    if spec is None:
        return None
    from deepshrink.core.errors import ConfigError
    from deepshrink.core.userfile import load_object

    fn = load_object(spec, what="evaluate.metric", error=ConfigError)
    if not callable(fn):
        raise ConfigError(f"evaluate.metric: {spec!r} is not a function")
    return fn


def _headline(m) -> str:
    """Accuracy with labels, else the variant's fidelity figure."""
    if m.accuracy is not None:
        return f"{m.accuracy:.2%}"
    if m.fidelity:
        value = m.fidelity["value"]
        return f"{m.fidelity['headline']} " + ("identical" if value is None else f"{value:.4g}")
    return "—"


def _role(label: str, state: RunState) -> dict:
    info = state.exports.get(label)
    if info is not None:
        return {"role": info["role"], "format": info["format"], "parity_max_abs_diff": info["parity_max_abs_diff"],
                "parity": info.get("parity"), "parity_passed": info.get("parity_passed")}
    return {"role": FP32 if label.startswith(FP32) else COMPRESSED, "format": "eager", "parity_max_abs_diff": None,
            "parity": None, "parity_passed": None}


def _report(state: RunState, config: ReportStage, ctx) -> dict:
    import json

    from deepshrink.report import write_report

    document = json.loads((ctx.out_dir / "metrics.json").read_text())
    path = write_report(document, ctx.out_dir / "report.html", title=config.title or f"deepshrink: {ctx.recipe.name}")
    return {"path": str(path), "line": str(path)}


HANDLERS: dict[str, Callable] = {
    "train": _train, "load": _load, "prune": _prune, "finetune": _finetune,
    "quantize": _quantize, "export": _export, "evaluate": _evaluate, "report": _report,
}
