"""Quantize within an accuracy budget: PTQ, then per-layer fp32 fallback, then QAT.

Accuracy is top-1 on ``data.val`` of the simulated (PyTorch) quantized graph, against the
float model on the same split; the drop is in percentage points. Without labels the figure is
fidelity (``accuracy_fn`` with the float model as reference; ``training.accuracy``): top-1 agreement
with the float model for a classifier (which agrees with itself 100 %), so the budget bounds the
share of answers that change; for embeddings and other tensors the mean cosine similarity of each
sample's output, so 0.5 pt bounds it at 0.995. The fallback leaves, one at
a time, the layer with the lowest SQNR on its own (``layer_sqnr_report``) in fp32, re-running
PTQ each time; QAT (with the fallback layers found so far kept in float) is the last resort.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field

from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.core.loops import AccuracyFn, TrainFn, require_accuracy
from deepshrink.core.progress import progress
from deepshrink.data.splits import DataSplits
from deepshrink.quantization.configs import Int8QAT, Int8Static

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetStep:
    action: str                      # "ptq", "fp32 fallback", "qat"
    accuracy: float                  # on data.val, in [0, 1]
    drop_pt: float                   # float accuracy minus this, percentage points
    fp32_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BudgetReport:
    max_drop_pt: float
    float_accuracy: float
    steps: tuple[BudgetStep, ...] = field(default_factory=tuple)
    met: bool = False

    @property
    def final(self) -> BudgetStep:
        return self.steps[-1]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        out = [f"float accuracy {self.float_accuracy:.2%} on val; budget {self.max_drop_pt:.2f} pt"]
        for s in self.steps:
            extra = f" (fp32: {', '.join(s.fp32_layers)})" if s.fp32_layers else ""
            out.append(f"{s.action}: {s.accuracy:.2%}, drop {s.drop_pt:+.2f} pt{extra}")
        out.append("budget met" if self.met else "budget NOT met: the returned model is the best one tried")
        return out


def quantize_within_budget(model: nn.Module, data: DataSplits, *, max_drop_pt: float, **options) -> tuple[nn.Module, BudgetReport]:
    """Deprecated: ``quantize(model, Int8WithinBudget(max_drop_pt=..., ptq=..., qat=...), data=data,
    train_fn=..., accuracy_fn=...)``, then ``quantize_report(q)["budget"]``. ``deepshrink.quantize``
    passes ``deepshrink.training.fit`` / ``accuracy``; here pass them (``search_within_budget``'s keywords)."""
    warnings.warn("quantize_within_budget is deprecated and will be removed in the next release: use "
                  "deepshrink.quantize(model, Int8WithinBudget(...), data=data)", DeprecationWarning, stacklevel=2)
    return search_within_budget(model, data, max_drop_pt=max_drop_pt, **options)


def search_within_budget(
    model: nn.Module,
    data: DataSplits,
    *,
    max_drop_pt: float,
    target: str = "xnnpack",
    ptq: Int8Static | None = None,
    qat: Int8QAT | None = None,
    max_fp32_layers: int = 3,
    sensitivity_samples: int = 256,
    train_fn: TrainFn | None = None,
    accuracy_fn: AccuracyFn | None = None,
) -> tuple[nn.Module, BudgetReport]:
    """The first model whose val accuracy drop is ``<= max_drop_pt``, and what was tried.

    ``ptq``: the PTQ config to start from (default ``Int8Static()``); ``qat``: the QAT config
    of the last step (default ``Int8QAT()``; pass ``Int8QAT(train=TrainConfig(epochs=...))`` to control cost).
    ``max_fp32_layers``: how many layers the fallback may leave in float before QAT.
    ``accuracy_fn`` measures every attempt and ``train_fn`` runs the QAT (``core.loops``); both are
    required, so a search that would end in QAT cannot fail after the PTQ attempts.
    If nothing meets the budget, the most accurate model is returned with ``met=False``.
    """
    from deepshrink.core.loops import run_training
    from deepshrink.quantization.api import quantize
    from deepshrink.quantization.report import layer_sqnr_report

    if not max_drop_pt >= 0:
        raise ConfigError(f"max_drop_pt: {max_drop_pt} must be >= 0 (percentage points of accuracy)")
    if max_fp32_layers < 0:
        raise ConfigError(f"max_fp32_layers: {max_fp32_layers} must be >= 0")
    accuracy = require_accuracy(accuracy_fn, who="Int8WithinBudget")
    if train_fn is None:
        run_training(None, model, data, (qat or Int8QAT()).train, who="Int8WithinBudget (its last resort, QAT,)")
    ptq = ptq or Int8Static()
    qat = qat or Int8QAT()
    val = data.loader("val", batch_size=512)
    float_acc = accuracy(model, val, reference=model)
    steps: list[BudgetStep] = []
    tried: list[tuple[float, nn.Module]] = []

    def attempt(action: str, config) -> bool:
        quantized = quantize(model, config, data=data, target=target, train_fn=train_fn, accuracy_fn=accuracy_fn)
        acc = accuracy(quantized, val, reference=model)
        steps.append(BudgetStep(action, acc, 100.0 * (float_acc - acc), tuple(config.fp32_layers)))
        tried.append((acc, quantized))
        # as it happens: the whole search can take minutes (a QAT at the end)
        log.info("budget: %s -> val %.2f %% (drop %.2f pt of %.2f allowed)%s", action, 100 * acc, steps[-1].drop_pt,
                 max_drop_pt, f"; fp32: {', '.join(config.fp32_layers)}" if config.fp32_layers else "")
        return steps[-1].drop_pt <= max_drop_pt

    met = attempt("ptq", ptq)
    fp32: list[str] = list(ptq.fp32_layers)
    for _ in progress(range(max_fp32_layers), "budget: fp32 fallback"):   # one layer more in fp32 each time
        if met:
            break
        # sensitivity in the latest PTQ model: the lowest SQNR on its own among layers still quantized
        rows = [r for r in layer_sqnr_report(model, tried[-1][1], data, samples=sensitivity_samples) if r.layer not in fp32]
        if not rows:
            break
        fp32.append(min(rows, key=lambda r: r.layer_sqnr_db).layer)
        met = attempt("fp32 fallback", dataclasses.replace(ptq, fp32_layers=tuple(fp32)))
    if not met:
        met = attempt("qat", dataclasses.replace(qat, fp32_layers=tuple(fp32)))
    chosen = tried[-1][1] if met else max(tried, key=lambda t: t[0])[1]
    return chosen, BudgetReport(max_drop_pt=max_drop_pt, float_accuracy=float_acc, steps=tuple(steps), met=met)
