"""The ``prune`` verb: score, select, attach masks. ``finalize`` drops the masks for good."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deepshrink.core.masks import attach_masks, detach_masks, get_masks
from deepshrink.core.registry import Registry
from deepshrink.core.selection import first_match, select, weighted_layers
from deepshrink.data.splits import DataSplits
from deepshrink.ops.masks import global_mask, local_mask
from deepshrink.pruning.configs import MagnitudePruning, PruningConfig
from deepshrink.pruning.importance import magnitude_scores

_HANDLERS: Registry = Registry("prune")


@dataclass
class PruneReport:
    """Per-layer kept/total weights after pruning, and the overall sparsity of the chosen layers."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (kept, total)

    @property
    def sparsity(self) -> float:
        kept = sum(k for k, _ in self.layers.values())
        total = sum(t for _, t in self.layers.values())
        return 1.0 - kept / max(total, 1)

    def as_dict(self) -> dict:
        return {"sparsity": self.sparsity, "layers": {n: {"kept": k, "total": t} for n, (k, t) in self.layers.items()}}


def prunable_weights(model: nn.Module, config: PruningConfig) -> dict[str, nn.Parameter]:
    """``{"<module>.weight": parameter}`` of the layers the config selects."""
    layers = weighted_layers(model)
    names = list(layers)
    if config.layers:
        chosen = select(names, config.layers, what="prune.layers")
    else:
        convs = [n for n in names if isinstance(layers[n], nn.modules.conv._ConvNd)]
        skipped = set()
        if config.skip_first_conv and convs:
            skipped.add(convs[0])
        if config.skip_classifier and names:
            skipped.add(names[-1])
        chosen = [n for n in names if n not in skipped]
    select(names, config.overrides, what="prune.overrides")  # a typo in overrides is an error too
    return {f"{n}.weight": layers[n].weight for n in chosen}


def prune(model: nn.Module, config: PruningConfig, *, data: DataSplits | None = None) -> PruneReport:
    """Attach masks to ``model`` (in place) that zero the least important weights.

    Masks compose with earlier ones: weights pruned before stay pruned. Call ``finalize`` once
    fine-tuning is done.
    """
    weights = prunable_weights(model, config)
    scores = _HANDLERS.handler_for(config)(model, weights, config, data)
    previous = get_masks(model)
    for name in scores:
        if name in previous:  # already-pruned weights rank below every live one
            scores[name] = torch.where(previous[name], scores[name], torch.full_like(scores[name], -1.0))
    overridden = {n: first_match(n.rsplit(".", 1)[0], config.overrides, None) for n in scores}
    fixed = {n: s for n, s in scores.items() if overridden[n] is not None}
    rest = {n: s for n, s in scores.items() if overridden[n] is None}
    masks = local_mask(fixed, {n: overridden[n] for n in fixed}) if fixed else {}
    if rest:
        masks.update(global_mask(rest, config.sparsity) if config.scope == "global" else local_mask(rest, config.sparsity))
    attach_masks(model, masks)
    final = get_masks(model)
    return PruneReport({n[: -len(".weight")]: (int(final[n].sum()), final[n].numel()) for n in weights})


def finalize(model: nn.Module) -> nn.Module:
    """Drop the masks: the zeros stay in the weights and no mask state remains on the module."""
    detach_masks(model)
    return model


@_HANDLERS.register(MagnitudePruning)
def _magnitude(model, weights, config: MagnitudePruning, data) -> dict[str, torch.Tensor]:
    return magnitude_scores(weights, config.norm)
