"""Mixed precision: per-layer sensitivity to weight width, and the widths that fit a budget.

Three separate steps (score, choose, apply):

1. ``bit_sensitivity`` quantizes one layer at a time at each width (the others stay float)
   and records, on the validation split, the loss, the accuracy, and the KL divergence of the
   output distribution from the float model's.
2. ``pareto_front`` / ``choose_widths`` predict a model's cost as the sum of its layers' costs
   (layers assumed independent, as HAWQ and the pruning sensitivity chooser do) and solve the
   multiple-choice knapsack over layers *exactly*: a dynamic
   program over layers whose states are the Pareto-optimal (size, predicted loss[, latency])
   partial assignments. Dominated states are dropped, so the work is bounded by the number
   of distinct achievable sizes (pseudo-polynomial, like the table DP) rather than
   ``len(widths) ** layers``; for LeNet-sized models it is milliseconds.
3. ``measure_front`` applies chosen widths (and uniform ones for comparison) to copies of the
   model and measures them, returning plain data for a report.

The cost (``objective``) is one of: ``"loss"``, the increase of the val cross-entropy;
``"accuracy"``, the val accuracy drop (both clamped at 0: a layer whose quantization happens to
help on this val set counts as free, never as a gain); ``"kl"``, the mean KL divergence of the
quantized model's outputs from the float model's (ZeroQ's sensitivity, Cai et al. 2020), which
is the loss increase against the float model's own predictions: never negative, and it keeps
falling with every added bit where the label loss is already flat, so it still ranks widths on
which the other two are tied at 0 (among ties the chooser takes the smaller model). ``"kl"`` is
the default.

Size is the bits of the weight codes, ``sum(numel * bits)``: scales, zero points and biases
are the same at every width and are left out of the budget (the .dsk bytes of measured points
include them). Latency, if given, is a user-measured ``{layer: {bits: ms}}`` table summed over
layers; eager PyTorch runs dequantized float weights, so it has no per-width latency to measure.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.masks import raw_parameter
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.lowbit.configs import MAX_BITS, MIN_BITS, UniformWeights, WeightOnly
from deepshrink.quantization.lowbit.uniform import quantize_weights_
from deepshrink.quantization.lowbit.weights import fit_affine, layer_widths

WIDTHS = (2, 3, 4, 5, 6, 8)
Objective = Literal["loss", "kl", "accuracy"]
OBJECTIVES = ("loss", "kl", "accuracy")


@dataclass
class BitSensitivity:
    """Val ``loss``/``accuracy``/``kl`` (from the float outputs) ``[layer][bits]`` with only ``layer``
    quantized; ``sizes``: its weight count."""

    baseline_loss: float
    baseline_accuracy: float
    sizes: dict[str, int] = field(default_factory=dict)
    loss: dict[str, dict[int, float]] = field(default_factory=dict)
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)
    kl: dict[str, dict[int, float]] = field(default_factory=dict)

    def cost(self, layer: str, bits: int, objective: Objective = "kl") -> float:
        """Loss increase, KL, or accuracy drop of ``layer`` alone at ``bits``; never negative."""
        if objective == "loss":
            return max(0.0, self.loss[layer][bits] - self.baseline_loss)
        if objective == "kl":
            return max(0.0, self.kl[layer][bits])
        return max(0.0, self.baseline_accuracy - self.accuracy[layer][bits])

    def as_dict(self) -> dict:
        def table(t):
            return {n: {str(b): v for b, v in c.items()} for n, c in t.items()}

        return {"baseline_loss": self.baseline_loss, "baseline_accuracy": self.baseline_accuracy,
                "sizes": dict(self.sizes), "loss": table(self.loss), "accuracy": table(self.accuracy),
                "kl": table(self.kl)}


@dataclass(frozen=True)
class WidthChoice:
    """One assignment of widths with its size and predicted cost (sums of per-layer numbers)."""

    widths: dict[str, int]
    size_bits: int
    predicted_loss_delta: float
    predicted_kl: float
    predicted_accuracy_drop: float
    latency_ms: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate_loss_accuracy(model: nn.Module, data: DataSplits, split: str = "val", *,
                           batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` on ``data.<split>``."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for x, y in data.loader(split, batch_size=batch_size):
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return total_loss / max(n, 1), correct / max(n, 1)


@torch.no_grad()
def _measure(model: nn.Module, data: DataSplits, split: str, batch_size: int,
             reference: list[torch.Tensor]) -> tuple[float, float, float]:
    """(loss, accuracy, mean KL(reference || model)); fills ``reference`` with log-probs if empty."""
    was_training = model.training
    model.eval()
    fill = not reference
    total_loss = total_kl = 0.0
    correct = n = 0
    for i, (x, y) in enumerate(data.loader(split, batch_size=batch_size)):
        logits = model(x)
        log_p = F.log_softmax(logits, 1)
        if fill:
            reference.append(log_p)
        total_loss += float(F.nll_loss(log_p, y, reduction="sum"))
        total_kl += float(F.kl_div(log_p, reference[i], log_target=True, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return total_loss / max(n, 1), correct / max(n, 1), total_kl / max(n, 1)


def bit_sensitivity(model: nn.Module, data: DataSplits, widths: Sequence[int] = WIDTHS, *,
                    config: UniformWeights | None = None, split: str = "val", batch_size: int = 1000) -> BitSensitivity:
    """Loss and accuracy on ``data.<split>`` with each layer ``config`` selects quantized alone
    (``config``'s symmetry and granularity) at each width. The model is left exactly as it was."""
    config = WeightOnly() if config is None else config
    widths = _check_widths(widths)
    layers = layer_widths(model, config.bits, config.layers, what="bit_sensitivity")
    modules = dict(model.named_modules())
    reference: list[torch.Tensor] = []
    base_loss, base_acc, _ = _measure(model, data, split, batch_size, reference)
    result = BitSensitivity(baseline_loss=base_loss, baseline_accuracy=base_acc)
    for name in layers:
        weight = raw_parameter(model, f"{name}.weight")   # behind a pruning mask, the tensor it reads
        original = modules[name].weight.detach().clone()
        result.sizes[name] = weight.numel()
        result.loss[name], result.accuracy[name], result.kl[name] = {}, {}, {}
        try:
            for bits in widths:
                qw = fit_affine(original, bits=bits, symmetric=config.symmetric, granularity=config.granularity,
                                group_size=config.group_size, layer=name)
                with torch.no_grad():
                    weight.copy_(qw.dequantize().to(weight.dtype))
                result.loss[name][bits], result.accuracy[name][bits], result.kl[name][bits] = _measure(
                    model, data, split, batch_size, reference)
        finally:
            with torch.no_grad():
                weight.copy_(original)
    return result


def pareto_front(sensitivity: BitSensitivity, *, objective: Objective = "kl",
                 size_budget_bits: int | None = None,
                 latency_ms: Mapping[str, Mapping[int, float]] | None = None,
                 latency_budget_ms: float | None = None) -> list[WidthChoice]:
    """Every width assignment not beaten in both size and predicted cost (and latency, if given)
    by another, within the budgets, sorted by size (cost falling). Exact; see the module doc."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: {objective!r} is not allowed; choose one of {', '.join(map(repr, OBJECTIVES))}")
    if latency_budget_ms is not None and latency_ms is None:
        raise ConfigError("latency_budget_ms: needs latency_ms, a {layer: {bits: ms}} table of measured timings")
    layers = list(sensitivity.sizes)
    if not layers:
        raise ConfigError("sensitivity: has no layers; measure it with bit_sensitivity first")
    if objective == "kl" and set(sensitivity.kl) != set(layers):
        raise ConfigError("objective: 'kl' needs the sensitivity's kl table (bit_sensitivity measures it); "
                          "use objective 'loss' or 'accuracy' for a sensitivity built without one")
    if latency_ms is not None:
        for name in layers:
            gaps = [b for b in sensitivity.loss[name] if b not in latency_ms.get(name, {})]
            if gaps:
                raise ConfigError(f"latency_ms.{name}: no timing for {gaps[0]} bits; give one per measured width")
    size_cap = float("inf") if size_budget_bits is None else size_budget_bits
    lat_cap = float("inf") if latency_budget_ms is None else latency_budget_ms
    # state: (size bits, predicted cost, latency, widths so far)
    states: list[tuple[int, float, float, tuple[int, ...]]] = [(0, 0.0, 0.0, ())]
    for name in layers:
        expanded = []
        for size, cost, lat, chosen in states:
            for bits in sorted(sensitivity.loss[name]):
                new_size = size + sensitivity.sizes[name] * bits
                new_lat = lat + (latency_ms[name][bits] if latency_ms is not None else 0.0)
                if new_size <= size_cap and new_lat <= lat_cap + 1e-12:
                    expanded.append((new_size, cost + sensitivity.cost(name, bits, objective), new_lat, chosen + (bits,)))
        states = _non_dominated(expanded, with_latency=latency_ms is not None)
        if not states:
            return []
    return [_choice(sensitivity, dict(zip(layers, chosen)), latency_ms) for _, _, _, chosen in states]


def choose_widths(sensitivity: BitSensitivity, *, size_budget_bits: int, objective: Objective = "kl",
                  latency_ms: Mapping[str, Mapping[int, float]] | None = None,
                  latency_budget_ms: float | None = None) -> WidthChoice:
    """The widths with the least predicted cost whose size is at most ``size_budget_bits``
    (and latency at most ``latency_budget_ms``); ties go to the smaller model."""
    front = pareto_front(sensitivity, objective=objective, size_budget_bits=size_budget_bits,
                         latency_ms=latency_ms, latency_budget_ms=latency_budget_ms)
    if not front:
        smallest = sum(n * min(sensitivity.loss[name]) for name, n in sensitivity.sizes.items())
        raise ConfigError(f"size_budget_bits: {size_budget_bits} (or the latency budget) cannot be met; the smallest "
                          f"measured assignment takes {smallest} bits: raise the budget or measure narrower widths")
    field_name = {"loss": "predicted_loss_delta", "kl": "predicted_kl", "accuracy": "predicted_accuracy_drop"}[objective]
    return min(front, key=lambda c: (getattr(c, field_name), c.size_bits))


def uniform_choice(sensitivity: BitSensitivity, bits: int,
                   latency_ms: Mapping[str, Mapping[int, float]] | None = None) -> WidthChoice:
    """Every layer at ``bits``, with its size and predicted cost, for comparison."""
    unmeasured = [n for n in sensitivity.sizes if bits not in sensitivity.loss[n]]
    if unmeasured:
        raise ConfigError(f"bits: {bits} was not measured for layer {unmeasured[0]}; include it in bit_sensitivity's widths")
    return _choice(sensitivity, {name: bits for name in sensitivity.sizes}, latency_ms)


def apply_widths(model: nn.Module, widths: Mapping[str, int], *, config: UniformWeights | None = None) -> nn.Module:
    """Quantize exactly the layers in ``widths`` at their widths (others stay float), in place."""
    config = WeightOnly() if config is None else config
    layers: dict[str, int | None] = {name: bits for name, bits in widths.items()}
    layers["*"] = None
    return quantize_weights_(model, WeightOnly(bits=config.bits, symmetric=config.symmetric,
                                               granularity=config.granularity, group_size=config.group_size,
                                               layers=layers))


def measure_front(model: nn.Module, data: DataSplits, sensitivity: BitSensitivity, *,
                  budgets_bits: Sequence[int], uniform: Sequence[int] = (8, 6, 4),
                  config: UniformWeights | None = None, split: str = "test",
                  objectives: Sequence[Objective] = ("kl",), save_dir: str | os.PathLike | None = None) -> dict:
    """Plain data for a size-vs-accuracy plot: the predicted Pareto front, and measured points.

    Measured: ``uniform`` widths, then ``choose_widths`` for each objective at each of
    ``budgets_bits`` (labelled ``mixed[objective] <= N bits``); each
    applied to a copy of ``model`` and measured on ``data.<split>``. With ``save_dir`` each is
    written with ``save_compressed``, its ``.dsk`` bytes reported, and the model loaded back
    from the file is what gets measured. Drops are against the float model on the same split
    (predicted ones come from the sensitivity's split).
    """
    from deepshrink.quantization.lowbit.storage import load_compressed, save_compressed

    config = WeightOnly() if config is None else config
    base_loss, base_acc = evaluate_loss_accuracy(model, data, split)
    candidates = [(f"uniform {b}-bit", "uniform", uniform_choice(sensitivity, b)) for b in uniform]
    for objective in objectives:
        for budget in budgets_bits:
            choice = choose_widths(sensitivity, size_budget_bits=budget, objective=objective)
            candidates.append((f"mixed[{objective}] <= {budget} bits", f"mixed-{objective}", choice))
    measured = []
    for label, kind, choice in candidates:
        quantized = apply_widths(copy.deepcopy(model), choice.widths, config=config)
        dsk_bytes = None
        if save_dir is not None:
            path = save_compressed(quantized, Path(save_dir) / f"{kind}-{choice.size_bits}.dsk")
            dsk_bytes, quantized = path.stat().st_size, load_compressed(path)
        loss, acc = evaluate_loss_accuracy(quantized, data, split)
        measured.append({"label": label, "kind": kind, **choice.as_dict(), "measured_loss": loss,
                         "measured_accuracy": acc, "measured_accuracy_drop": base_acc - acc,
                         "measured_on": "module" if save_dir is None else "dsk", "dsk_bytes": dsk_bytes})
    front = {objective: [c.as_dict() for c in pareto_front(sensitivity, objective=objective)] for objective in objectives}
    return {"split": split, "baseline": {"loss": base_loss, "accuracy": base_acc},
            "sensitivity": sensitivity.as_dict(), "front": front, "measured": measured}


def _choice(sensitivity: BitSensitivity, widths: dict[str, int],
            latency_ms: Mapping[str, Mapping[int, float]] | None) -> WidthChoice:
    return WidthChoice(
        widths=widths,
        size_bits=sum(sensitivity.sizes[n] * b for n, b in widths.items()),
        predicted_loss_delta=sum(sensitivity.cost(n, b, "loss") for n, b in widths.items()),
        predicted_kl=sum(sensitivity.cost(n, b, "kl") for n, b in widths.items()) if sensitivity.kl else 0.0,
        predicted_accuracy_drop=sum(sensitivity.cost(n, b, "accuracy") for n, b in widths.items()),
        latency_ms=None if latency_ms is None else sum(latency_ms[n][b] for n, b in widths.items()),
    )


def _non_dominated(states, *, with_latency: bool):
    """Drop states another beats or ties in size, cost (and latency); keeps the first of exact ties."""
    states = sorted(states, key=lambda s: (s[0], s[1], s[2]))
    kept = []
    if not with_latency:
        best = float("inf")
        for s in states:
            if s[1] < best:
                kept.append(s)
                best = s[1]
        return kept
    for s in states:
        if not any(k[1] <= s[1] and k[2] <= s[2] for k in kept):
            kept.append(s)
    return kept


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted(set(widths)))
    if not out or any(isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS for b in out):
        raise ConfigError(f"widths: {list(widths)} must be integers in {MIN_BITS}..{MAX_BITS}, e.g. (2, 3, 4, 5, 6, 8)")
    return out


__all__ = ["WIDTHS", "OBJECTIVES", "BitSensitivity", "WidthChoice", "evaluate_loss_accuracy", "bit_sensitivity", "pareto_front",
           "choose_widths", "uniform_choice", "apply_widths", "measure_front"]
