"""Post-training int8 through PT2E (torchao) with the XNNPACK quantizer, driven by the target.

Static: float graph (batch norm and padding folded) -> prepare -> calibrate (with
``calibration="auto"``, every range method compared on the same histograms) -> convert; then
the optional repairs, each kept only if int8 fidelity to the float model on the calibration
samples does not drop: cross-layer equalization (a second quantization of the equalized graph,
the better one kept), AdaRound (learned up-or-down rounding of the int8 weight codes) and bias
correction, in that order; last, mixed precision by measured sensitivity (the layers whose int8
costs the output most re-quantized in float, ``quantization.mixed_precision``). Dynamic: prepare -> one forward so the weight observers
see the weights -> convert. Both record what they did in ``model._deepshrink_quant``.
"""
from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from deepshrink.core import samples as S
from deepshrink.core.errors import ConfigError
from deepshrink.core.progress import progress
from deepshrink.core.graph import drop_unused_weights
from deepshrink.core.selection import select
from deepshrink.core.targets import GUARDED_LAYOUTS, TargetProfile
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.configs import Int8Dynamic, Int8Static
from deepshrink.quantization.mixed_precision import ANNOTATED
from deepshrink.quantization.quantizer import RECURRENT_TARGETS, build_quantizer, layer_name, quantization_config

log = logging.getLogger(__name__)


@torch.no_grad()
def calibrate(prepared: nn.Module, data: DataSplits, samples: int, batch_size: int = 64) -> int:
    """Run up to ``samples`` samples of ``data.calib`` through ``prepared``; returns how many ran."""
    seen = 0
    for x in progress(data.batches("calib", samples=samples, batch_size=batch_size), "calibrating"):
        S.call(prepared, x)
        seen += S.batch_size(x)
    return seen


def check_fp32_layers(model: nn.Module, patterns: tuple[str, ...], *, what: str = "fp32_layers") -> tuple[str, ...]:
    """Patterns must each match a module (a typo must not silently quantize everything)."""
    if not patterns:
        return ()
    names = [name for name, _ in model.named_modules() if name]
    return tuple(select(names, patterns, what=what))


def quantize_static(model: nn.Module, config: Int8Static, data: DataSplits, target: TargetProfile, *,
                    fp32_nodes: tuple[str, ...] = ()) -> torch.fx.GraphModule:
    """``fp32_nodes``: graph nodes left float besides ``config.fp32_layers`` (mixed precision's
    choice of single ops, such as a residual add; node names of ``float_graph``)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from deepshrink.quantization.graph_passes import float_graph

    fp32 = check_fp32_layers(model, config.fp32_layers)
    per_channel = target.quantizer.per_channel_weights if config.per_channel is None else config.per_channel
    graph, _ = float_graph(model, data.example_input(), max_batch=target.max_batch, dynamic=data.dynamic)
    layout = config.int8_layout or target.quantizer.int8_layout

    search: dict[str, dict] = {}

    def ptq(source: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int, list[dict]]:
        auto = config.calibration == "auto"
        quantizer = build_quantizer(
            quantization_config(per_channel=per_channel, calibration="histogram" if auto else config.calibration,
                                percentile=config.percentile, int8_layout=layout),
            fp32_layers=fp32, embeddings=config.embeddings, fp32_nodes=fp32_nodes, float_outputs=config.float_outputs,
        )
        prepared = prepare_pt2e(source, quantizer)
        seen = calibrate(prepared, data, config.calibration_samples)
        if auto:   # one calibration pass: every method picks its range from the same histograms
            search.clear()
            search.update(compare_calibrations(prepared, batches, expected))
            set_calibration(prepared, best_calibration(search))
        ranges = activation_ranges_of(prepared)
        converted = convert_pt2e(prepared)
        drop_unused_weights(converted)   # the float originals of the folded int8 weights
        object.__setattr__(converted, ANNOTATED, quantizer.annotated)   # what mixed precision measures by
        return converted, seen, ranges

    repairs = config.equalization != "none" or config.bias_correction or config.rounding == "adaround"
    recurrent = config.recurrent_rounding == "gptq" and any(
        n.op == "call_function" and n.target in RECURRENT_TARGETS for n in graph.graph.nodes)
    # mixed precision and the calibration search measure against the float function like the repairs do
    measured = repairs or recurrent or config.mixed_precision is not None or config.calibration == "auto"
    if measured:
        from deepshrink.quantization.bias_correction import calibration_batches, channel_means

        batches = calibration_batches(data, config.calibration_samples)
        # the original float function: what every repair is measured against
        expected = channel_means(graph, batches, [], desc="float reference outputs")[1]
    reference = copy.deepcopy(graph) if measured else None
    if layout in GUARDED_LAYOUTS and reference is None:
        from deepshrink.quantization.weight_range import float_weights

        source_weights = float_weights(graph)   # before prepare: what narrowed channels re-quantize from
    result = ptq(graph)
    equalization: dict = {"mode": "none", "applied": False}
    if config.equalization != "none":
        from deepshrink.quantization.equalization import guarded_equalization

        result, reference, equalization = guarded_equalization(reference, result, ptq, batches, expected,
                                                               relu6_as_relu=config.equalization == "cle_relu6_as_relu")
    converted, seen, ranges = result
    details = {
        "calibration": best_calibration(search) if search else config.calibration,
        **({"calibration_search": dict(search)} if search else {}),
        "calibration_samples_used": seen, "per_channel": per_channel,
        "activation_ranges": ranges, "equalization": equalization, "fp32_layers": list(fp32), "int8_layout": layout,
        **({"fp32_nodes": list(fp32_nodes)} if fp32_nodes else {}),
    }
    if layout in GUARDED_LAYOUTS:
        from deepshrink.quantization.bias_correction import calibration_batches
        from deepshrink.quantization.weight_range import float_weights, guard_weight_range, merge_reports

        # before the rounding repair, which then re-rounds the narrowed channels within 7 bits, and
        # before bias correction, which then sees their error too
        weights = float_weights(reference) if reference is not None else source_weights
        guard_batches = batches if measured else calibration_batches(data, config.calibration_samples)
        details["weight_range"] = guard_weight_range(converted, weights, guard_batches)
    if recurrent:
        from deepshrink.quantization.recurrent_rounding import round_recurrent

        # first: the layers after a cell (a projection, AdaRound's and bias correction's) then see it re-rounded
        details["recurrent_rounding"] = round_recurrent(converted, reference, batches, expected=expected)
    if config.rounding == "adaround":
        from deepshrink.quantization.adaround import adaround

        started = time.perf_counter()
        # before bias correction: re-rounding moves each layer's mean error, which the correction then removes
        details["adaround"] = adaround(converted, reference, batches, expected=expected)
        details["adaround"]["seconds"] = round(time.perf_counter() - started, 3)
        if layout in GUARDED_LAYOUTS:   # a code moved up by one can push a full-range channel's pair past int16
            details["weight_range"] = merge_reports(details["weight_range"], guard_weight_range(converted, weights, guard_batches))
    if layout in GUARDED_LAYOUTS:   # once, for both guard passes (a pass alone lists only the layers it narrowed)
        from deepshrink.quantization.weight_range import weight_range_line

        log.info("%s", weight_range_line(details["weight_range"]))
    if config.bias_correction:
        from deepshrink.quantization.bias_correction import correct_bias

        started = time.perf_counter()
        details["bias_correction"] = correct_bias(converted, reference, batches, expected=expected)
        details["bias_correction"]["seconds"] = round(time.perf_counter() - started, 3)
    object.__setattr__(converted, "_deepshrink_quant", details)
    if config.mixed_precision is not None:
        import dataclasses

        from deepshrink.quantization.mixed_precision import keep_float
        from deepshrink.quantization.weight_range import float_weights

        def requantize(layers: tuple[str, ...], nodes: tuple[str, ...]) -> torch.fx.GraphModule:
            return quantize_static(model, dataclasses.replace(config, fp32_layers=fp32 + layers, mixed_precision=None), data,
                                   target, fp32_nodes=fp32_nodes + nodes)

        # last: it measures each layer against everything the repairs made of the others
        converted, report = keep_float(converted, float_weights(reference), batches, expected, requantize,
                                       config=config.mixed_precision, annotated=getattr(converted, ANNOTATED))
        object.__setattr__(converted, "_deepshrink_quant", {**converted._deepshrink_quant, "mixed_precision": report})
    return converted


def compare_calibrations(prepared: torch.fx.GraphModule, batches: list, expected: list) -> dict[str, dict]:
    """Each calibration method's int8 output fidelity (``{agreement, sqnr_db}`` against ``expected``
    on ``batches``), from the histograms ``prepared``'s observers already hold: one calibration,
    one conversion and one pass of the samples per method."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from deepshrink.quantization.bias_correction import output_fidelity
    from deepshrink.quantization.observers import METHODS

    out = {}
    for method in progress(METHODS, "calibration: comparing methods"):
        trial = copy.deepcopy(prepared)
        set_calibration(trial, method)
        converted = convert_pt2e(trial)
        with torch.no_grad():
            out[method] = output_fidelity(expected, [S.call(converted, x) for x in batches])
    return out


def best_calibration(search: dict[str, dict]) -> str:
    """The method of highest output SQNR (ties: higher top-1 agreement, then the order of ``METHODS``)."""
    from deepshrink.quantization.observers import METHODS

    return max(METHODS, key=lambda m: (search[m]["sqnr_db"], search[m]["agreement"] or 0.0, -METHODS.index(m)))


def set_calibration(prepared: torch.fx.GraphModule, method: str) -> None:
    from deepshrink.quantization.observers import CalibrationObserver

    for module in prepared.modules():
        if isinstance(module, CalibrationObserver):
            module.method = method


def quantize_dynamic(model: nn.Module, config: Int8Dynamic, data: DataSplits, target: TargetProfile) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from deepshrink.core.graph import capture

    per_channel = target.quantizer.per_channel_weights if config.per_channel is None else config.per_channel
    if not per_channel and target.export_format == "pte":
        raise ConfigError(
            "Int8Dynamic.per_channel: False is not runnable on XNNPACK (its dynamically quantized linear and conv "
            "need one weight scale per output channel); use per_channel=True, or Int8Static for per-tensor weights"
        )
    fp32 = check_fp32_layers(model, config.fp32_layers)
    graph = capture(model, data.example_input(), max_batch=target.max_batch, dynamic=data.dynamic).module()
    layout = config.int8_layout or target.quantizer.int8_layout
    prepared = prepare_pt2e(graph, build_quantizer(quantization_config(per_channel=per_channel, dynamic=True, int8_layout=layout),
                                                   fp32_layers=fp32, embeddings=config.embeddings))
    # weight observers record only when they run: without this pass every weight scale stays at its
    # default (1.0 per tensor, one entry per channel) — the cause of the old export failures
    with torch.no_grad():
        prepared(data.example_input(2))
    converted = convert_pt2e(prepared)
    drop_unused_weights(converted)   # the float originals of the folded int8 weights
    object.__setattr__(converted, "_deepshrink_quant", {"per_channel": per_channel, "fp32_layers": list(fp32), "int8_layout": layout})
    return converted


def activation_ranges_of(prepared: torch.fx.GraphModule) -> list[dict]:
    """Per activation observer (once per shared group): the node and layer it watches, the
    observed min/max, the chosen range and the resulting ``scale``/``zero_point``.

    ``min``/``max`` are the representable range ``[(qmin - zp) * scale, (qmax - zp) * scale]``:
    what the int8 tensor can hold, after the range was stretched to include 0.
    """
    from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase

    from deepshrink.quantization.observers import CalibrationObserver

    rows, seen = [], set()
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        if not isinstance(module, (ObserverBase, FakeQuantizeBase)) or id(module) in seen:
            continue
        watched = node.args[0]
        observer = module.activation_post_process if isinstance(module, FakeQuantizeBase) else module
        # weights (symmetric; in QAT computed from batch norm, so not always a get_attr) are not
        # activations; dynamic ranges exist only at run time
        if watched.op == "get_attr" or getattr(observer, "qscheme", None) != torch.per_tensor_affine or getattr(module, "is_dynamic", False):
            continue
        seen.add(id(module))
        if not hasattr(observer, "min_val") or observer.min_val.numel() == 0 or torch.isinf(observer.min_val).any():
            continue
        scale, zero_point = module.calculate_qparams()
        scale, zero_point = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
        qmin, qmax = observer.quant_min, observer.quant_max
        chosen = observer.chosen_range() if isinstance(observer, CalibrationObserver) else (float(observer.min_val), float(observer.max_val))
        rows.append({
            "node": watched.name,
            "layer": "input" if watched.op == "placeholder" else layer_name(watched),
            "method": getattr(observer, "method", type(observer).__name__),
            "observed_min": float(observer.min_val), "observed_max": float(observer.max_val),
            "clip_min": chosen[0], "clip_max": chosen[1],
            "min": (qmin - zero_point) * scale, "max": (qmax - zero_point) * scale,
            "scale": scale, "zero_point": zero_point,
        })
    return rows
