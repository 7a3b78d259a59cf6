"""The channel graph: which channels of which tensors must be removed together.

Every output channel of a prunable Conv/Linear ("a producer") is one *element*. The analysis
(``dependency.py``) walks the traced graph and records, for every weight or BatchNorm tensor,
which element each index along one dimension carries (a ``ParamSlice``), and it *unites*
elements that an operation forces to share a fate: the two operands of a residual addition,
the input and output of a depthwise convolution. United elements form a *class*; a class is
kept or removed as a whole. Elements that reach something the analysis does not understand
(the model's output, an unknown op) are *fixed*: their classes are never removed.

Classes whose elements come from the same producers, with the same multiplicities, form one
``ChannelGroup``: the unit that importance ranks, ratios apply to and widths round within.
A residual stage ``{stem, block1.project}`` is one group; a layer fed by a concatenation of
two such stages belongs to two groups, one per half, so each half rounds on its own and the
layer's width is the sum of two multiples.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class ParamSlice:
    """Index ``i`` along ``dim`` of ``<module>.<param>`` carries element ``elements[i]``."""

    module: str
    param: str            # "weight", "bias", "running_mean" or "running_var"
    dim: int
    elements: tuple[int, ...]


@dataclass(frozen=True)
class Unsupported:
    """Something the analysis left unpruned, and the channels it had to keep because of it."""

    where: str            # module path (and op) as a user would name it
    reason: str
    elements: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channel classes removed together; ``classes[i]`` is one channel of every producer in
    ``layers`` (``multiplicity`` channels each, e.g. 2 for a layer fed twice by a concat)."""

    index: int
    layers: tuple[str, ...]
    multiplicity: tuple[int, ...]
    classes: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def name(self) -> str:
        return " + ".join(self.layers)


@dataclass
class ChannelGraph:
    """Elements, their union-find classes, and every weight slice that carries them."""

    parent: list[int] = field(default_factory=list)
    owner: list[tuple[str, int] | None] = field(default_factory=list)   # element -> (producer, channel)
    fixed: set[int] = field(default_factory=set)
    slices: list[ParamSlice] = field(default_factory=list)
    producers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # layer -> element per output channel
    unsupported: list[Unsupported] = field(default_factory=list)

    # -- building (used by the analysis) --------------------------------------------------
    def new_elements(self, count: int, *, producer: str | None = None, fixed: bool = False) -> tuple[int, ...]:
        start = len(self.parent)
        ids = tuple(range(start, start + count))
        self.parent.extend(ids)
        self.owner.extend((producer, i) if producer else None for i in range(count))
        if fixed:
            self.fixed.update(ids)
        if producer is not None:
            self.producers[producer] = ids
        return ids

    def find(self, element: int) -> int:
        root = element
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[element] != root:  # path compression
            self.parent[element], element = root, self.parent[element]
        return root

    def unite(self, a: Iterable[int], b: Iterable[int]) -> None:
        for x, y in zip(a, b, strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def fix(self, elements: Iterable[int]) -> None:
        self.fixed.update(elements)

    # -- reading ---------------------------------------------------------------------------
    def fixed_classes(self, exclude: Iterable[str] = ()) -> set[int]:
        """Classes that must stay: any member fixed, or produced by an excluded layer."""
        excluded = {e for name in exclude for e in self.producers.get(name, ())}
        return {self.find(e) for e in self.fixed | excluded}

    def groups(self, exclude: Iterable[str] = ()) -> list[ChannelGroup]:
        """Prunable classes grouped by the producers they span, in producer definition order."""
        fixed = self.fixed_classes(exclude)
        members: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for element, owner in enumerate(self.owner):
            if owner is not None:
                members[self.find(element)].append(owner)
        order = {name: i for i, name in enumerate(self.producers)}
        by_signature: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for cls, owners in members.items():
            if cls in fixed:
                continue
            counts: dict[str, int] = defaultdict(int)
            for name, _ in owners:
                counts[name] += 1
            signature = tuple(sorted(counts.items(), key=lambda kv: order[kv[0]]))
            first = min(channel for name, channel in owners if name == signature[0][0])
            by_signature[signature].append((first, cls))
        ordered = sorted(by_signature.items(), key=lambda kv: (order[kv[0][0][0]], min(kv[1])[0]))
        return [
            ChannelGroup(i, tuple(n for n, _ in sig), tuple(c for _, c in sig), tuple(cls for _, cls in sorted(entries)))
            for i, (sig, entries) in enumerate(ordered)
        ]

    def layers_touching(self, elements: Iterable[int]) -> list[str]:
        """Producers that own a channel in the classes of ``elements`` (for warnings)."""
        classes = {self.find(e) for e in elements}
        names = {owner[0] for e, owner in enumerate(self.owner) if owner is not None and self.find(e) in classes}
        return [n for n in self.producers if n in names]
