"""Fidelity: how far a compressed variant is from the fp32 model it came from, without labels.

The figure is chosen by the kind of output, and can be overridden:

- ``classification`` (rows of scores: ``[..., classes]``): top-1 agreement, top-5 overlap (mean share
  of the reference's 5 best classes among the variant's 5 best), mean KL(reference || variant) of
  the softmax;
- ``embedding`` (rows of vectors): cosine similarity, mean and min, and nearest-neighbour overlap@k
  (for each eval sample, the share of its k nearest eval samples under the reference that stay
  among its k nearest under the variant — what retrieval and speaker verification depend on);
- ``tensor`` (anything else): SQNR in dB (signal power over error power) and max |Δ|, per output.

The default: a 2-D first output whose rows all have unit norm is an ``embedding``; another 2-D
output is ``classification``; anything else is ``tensor``. A user metric ``fn(reference, produced)
-> dict`` (each a list of output tuples, one per batch) adds its figures.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from deepshrink.core.errors import ConfigError
from deepshrink.core.outputs import output_kind

Kind = Literal["classification", "embedding", "tensor"]
KINDS: tuple[str, ...] = ("classification", "embedding", "tensor")
HEADLINE = {"classification": "top1_agreement", "embedding": "cosine_mean", "tensor": "sqnr_db"}


def _rows(outputs: Sequence[tuple], index: int) -> torch.Tensor:
    """Output ``index`` of every batch as rows ``[samples, features]`` (batches may differ in length)."""
    parts = [o[index].detach().float() for o in outputs]
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts).reshape(-1, parts[0].shape[-1]) if parts[0].ndim >= 2 else torch.cat(parts).reshape(-1, 1)
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])


def classification(ref: torch.Tensor, out: torch.Tensor) -> dict:
    k = min(5, ref.shape[-1])
    top_ref, top_out = ref.topk(k, -1).indices, out.topk(k, -1).indices
    overlap = (top_ref.unsqueeze(-1) == top_out.unsqueeze(-2)).any(-1).float().sum(-1) / k
    # in float64, and never below 0: float32 rounding made a near-identical file's KL read -1.7e-08
    kl = F.kl_div(F.log_softmax(out.double(), -1), F.log_softmax(ref.double(), -1), log_target=True, reduction="batchmean")
    return {"top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).float().mean()),
            f"top{k}_overlap": float(overlap.mean()), "mean_kl": max(0.0, float(kl))}


def embedding(ref: torch.Tensor, out: torch.Tensor, k: int = 5) -> dict:
    cos = F.cosine_similarity(ref, out, dim=-1)
    result = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    n = ref.shape[0]
    if n > 2:
        k = min(k, n - 1)

        def neighbours(e: torch.Tensor) -> torch.Tensor:
            e = F.normalize(e, dim=-1)
            sim = e @ e.T
            sim.fill_diagonal_(-math.inf)
            return sim.topk(k, -1).indices

        a, b = neighbours(ref), neighbours(out)
        result[f"neighbour_overlap_at_{k}"] = float((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean())
    return result


def tensor(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """SQNR in dB (``None`` when the outputs are identical: no noise, and JSON has no infinity) and max |Δ|."""
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref ** 2).sum())
    sqnr = None if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    return {"sqnr_db": sqnr, "identical": noise == 0, "max_abs_diff": float((ref - out).abs().max()) if ref.numel() else 0.0}


def fidelity(reference: Sequence[tuple], produced: Sequence[tuple], *, kind: str | None = None,
             metric: Callable | None = None) -> dict:
    """Figures of ``produced`` against ``reference`` (each a list, one tuple of output tensors per batch)."""
    if not reference:
        raise ConfigError("fidelity: no eval samples")
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"fidelity: {kind!r} is not one of {', '.join(KINDS)}")
    kind = kind or output_kind(reference[0][0])
    ref0, out0 = _rows(reference, 0), _rows(produced, 0)
    if ref0.shape != out0.shape:
        raise ConfigError(f"fidelity: the variant's first output has shape {tuple(out0.shape)}, the reference's {tuple(ref0.shape)}")
    figures = {"classification": classification, "embedding": embedding, "tensor": tensor}[kind](ref0, out0)
    result: dict = {"kind": kind, "samples": sum(int(o[0].shape[0]) for o in reference), **figures,
                    "headline": HEADLINE[kind], "value": figures[HEADLINE[kind]]}
    outputs = len(reference[0])
    if outputs > 1:
        result["outputs"] = [tensor(_rows(reference, i), _rows(produced, i)) for i in range(outputs)]
    if metric is not None:
        try:
            extra = metric(list(reference), list(produced))
        except (Exception, SystemExit) as err:  # the user's function may raise anything, even call sys.exit()
            raise ConfigError(f"fidelity: the user metric failed: {type(err).__name__}: {err}") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"fidelity: the user metric returned {type(extra).__name__}; return a dict of figures")
        try:
            result["user"] = {str(k): float(v) for k, v in extra.items()}
        except (TypeError, ValueError) as err:
            raise ConfigError(f"fidelity: the user metric returned a figure that is not a number ({err}); "
                              "return a dict of numbers") from None
    return result
