"""Selection step: from per-weight scores and a config's scope, groups, overrides and pattern,
pick the masks. Pure: no model, no data, nothing attached.

Precedence, per layer: an override (its own sparsity, local) beats a group (one threshold
shared by the group's layers) beats ``scope`` (one threshold for all remaining layers, or one
per layer). With an ``N:M`` pattern every layer keeps N of each M, so scopes do not apply.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from deepshrink.core.errors import ConfigError
from deepshrink.core.selection import first_match, matches, select
from deepshrink.ops.masks import NM, check_fits, global_mask, local_mask, nm_mask
from deepshrink.pruning.configs import PruningConfig


def layer_of(weight_name: str) -> str:
    """``"hidden.0.weight"`` -> ``"hidden.0"``: configs name modules, masks name parameters."""
    return weight_name.rsplit(".", 1)[0]


def check_layer_patterns(table: Iterable[str], chosen: list[str], names: list[str], *, what: str) -> None:
    """Every pattern must match a layer being pruned: a typo, or a pattern naming only a layer
    that the config leaves dense, would otherwise be silently ignored."""
    for pattern in table:
        hits = select(names, [pattern], what=what)  # invalid regex / matches no layer at all
        if not any(matches(pattern, n) for n in chosen):
            raise ConfigError(f"{what}: {pattern!r} matches only layers that are not pruned ({', '.join(hits)}); "
                              f"name them in `layers` (or set skip_first_conv / skip_classifier to false) to prune them")


def choose_masks(scores: Mapping[str, torch.Tensor], config: PruningConfig) -> dict[str, torch.Tensor]:
    """Keep-masks for ``scores`` (keyed ``"<module>.weight"``) following ``config``'s selection fields."""
    pattern = config.parsed_pattern
    for name, s in scores.items():
        check_fits(layer_of(name), s.shape, pattern)
    if isinstance(pattern, NM):
        return {n: nm_mask(s, pattern.n, pattern.m) for n, s in scores.items()}
    overridden = {n: first_match(layer_of(n), config.overrides, None) for n in scores}
    fixed = {n: s for n, s in scores.items() if overridden[n] is not None}
    masks = local_mask(fixed, {n: overridden[n] for n in fixed}, block=pattern) if fixed else {}
    rest = {n: s for n, s in scores.items() if overridden[n] is None}
    group_of = {n: first_match(layer_of(n), {p: p for p in config.groups}, None) for n in rest}
    for group, sparsity in config.groups.items():
        members = {n: s for n, s in rest.items() if group_of[n] == group}
        if members:
            masks.update(global_mask(members, sparsity, block=pattern))
    rest = {n: s for n, s in rest.items() if group_of[n] is None}
    if rest:
        if config.scope == "global":
            masks.update(global_mask(rest, config.sparsity, block=pattern))
        else:
            masks.update(local_mask(rest, config.sparsity, block=pattern))
    return {n: masks[n] for n in scores}
