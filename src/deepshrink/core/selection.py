"""Layer selection by fully qualified name or regex, shared by pruning and quantization.

A pattern is an exact module name (``fc1``), a regex prefixed ``re:`` (``re:hidden\\..*``), or
``*`` for every candidate. A pattern that matches no candidate is an error: a typo must not
silently select nothing.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, TypeVar

from torch import nn

from deepshrink.core.errors import ConfigError

V = TypeVar("V")
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and Linear modules by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHTED)}


def select(candidates: Iterable[str], patterns: Iterable[str], *, what: str) -> list[str]:
    names = list(candidates)
    chosen: list[str] = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ConfigError(f"{what}: {pattern!r} is not a valid regex ({err})") from None
        hits = [n for n in names if matches(pattern, n)]
        if not hits:
            raise ConfigError(f"{what}: {pattern!r} matches no layer; layers are: {', '.join(names)}")
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in names if n in chosen]


def first_match(name: str, table: Mapping[str, V], default: V) -> V:
    """Value of the first pattern in ``table`` that matches ``name`` (dict order), else default."""
    for pattern, value in table.items():
        if matches(pattern, name):
            return value
    return default
