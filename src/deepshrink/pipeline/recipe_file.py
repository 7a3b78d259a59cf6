"""Reading a recipe file strictly: whatever is in it ends as plain data or one ``ConfigError``.

- Text: UTF-8 only (a UTF-8 byte-order mark is allowed), at most ``MAX_BYTES``. A UTF-16/32 file
  or a binary one is refused by name, never decoded by guesswork.
- YAML: ``StrictLoader``, a ``yaml.SafeLoader`` (plain data only, never a Python object) that
  - refuses a key given twice in one mapping (YAML forbids it; PyYAML keeps the last silently),
    naming the key and both lines; a merge key (``<<: *base``) may still be overridden;
  - refuses nesting deeper than ``MAX_DEPTH`` while composing, before Python's recursion runs out;
  - allows anchors and aliases (a recipe may share one ``retrain`` block between stages) but
    counts the document as if every alias were written out: more than ``MAX_NODES`` values, or
    an alias that contains itself, is refused. The count walks the composed node graph once,
    each shared node measured once, so a billion-laughs file is refused in milliseconds;
  - reads ``1e-4`` as a float, as YAML 1.2 does (PyYAML's YAML 1.1 reads it as a string).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from deepshrink.core.config import short_repr
from deepshrink.core.errors import ConfigError

MAX_BYTES = 1 << 20       # a recipe is a screenful; a megabyte of YAML is a mistake or an attack
MAX_DEPTH = 32            # the packaged and example recipes nest at most 7 deep
MAX_NODES = 100_000       # values after alias expansion; the packaged recipes hold about 100

_MERGE_TAG = "tag:yaml.org,2002:merge"
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


class _Refused(yaml.MarkedYAMLError):
    """A well-formed document this loader will not build (a limit, or a duplicate key)."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with duplicate keys, deep nesting and alias bombs refused (module doc)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(problem=f"nesting deeper than {MAX_DEPTH} levels; a recipe needs a handful",
                               problem_mark=self.peek_event().start_mark)
            self._aliases += self.check_event(yaml.AliasEvent)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:   # an unhashable key: SafeConstructor says so below
                    continue
                if seen:
                    raise _Refused(problem=f"key {short_repr(key)} is given twice in one mapping (first at line "
                                           f"{first_line[key]}); keep one of them", problem_mark=key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _measure(node, 1, {}, set(), aliased=self._aliases > 0)
        return node


# YAML 1.2 floats: an exponent without a dot or a sign (1e-4, 1e5) is a number, not a string
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _measure(node: Node, depth: int, memo: dict[int, tuple[int, int]], open_nodes: set[int], *,
             aliased: bool) -> tuple[int, int]:
    """``(values, height)`` of ``node`` with aliases expanded; refuses a bomb, a loop, or depth."""
    if depth > MAX_DEPTH:
        raise _Refused(problem=f"nesting deeper than {MAX_DEPTH} levels once aliases are expanded; a recipe needs a handful",
                       problem_mark=node.start_mark)
    key = id(node)
    if key in open_nodes:
        raise _Refused(problem="an alias refers to a node that contains it (an endless document)",
                       problem_mark=node.start_mark)
    if key in memo:
        size, height = memo[key]
    else:
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        open_nodes.add(key)
        size, height = 1, 0
        for child in children:
            child_size, child_height = _measure(child, depth + 1, memo, open_nodes, aliased=aliased)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_NODES:
                what = ("anchors and aliases expand to more than {:,} values (an alias bomb?); write the shared values "
                        "out, or share fewer" if aliased else "holds more than {:,} values; a recipe needs a few hundred")
                raise _Refused(problem=what.format(MAX_NODES), problem_mark=node.start_mark)
        open_nodes.discard(key)
        memo[key] = (size, height)
    if depth + height > MAX_DEPTH:
        raise _Refused(problem=f"nesting deeper than {MAX_DEPTH} levels once aliases are expanded; a recipe needs a handful",
                       problem_mark=node.start_mark)
    return size, height


def read_text(path: Path) -> str:
    """The file's text, if it is a UTF-8 text file of at most ``MAX_BYTES``."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"recipe: {path} is {size / (1 << 20):.1f} MiB; a recipe is at most "
                              f"{MAX_BYTES >> 20} MiB of YAML (is this the right file?)")
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"recipe: {path} cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"recipe: {path} is over {MAX_BYTES >> 20} MiB; a recipe is at most {MAX_BYTES >> 20} MiB of YAML")
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise ConfigError(f"recipe: {path} is not UTF-8 text (it starts with a {name} byte-order mark); save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe: {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "a recipe is a YAML text file saved as UTF-8") from None
    if "\x00" in text:
        raise ConfigError(f"recipe: {path} is not a text file (it contains NUL bytes); a recipe is a YAML text file")
    return text.removeprefix("\ufeff")


def load_yaml(path: Path) -> Any:
    """Plain data from the recipe file at ``path``, read by ``StrictLoader``."""
    text = read_text(path)
    loader = None
    try:
        loader = StrictLoader(text)   # the reader refuses control characters here already
        return loader.get_single_data()
    except _Refused as err:
        mark = err.problem_mark
        raise ConfigError(f"recipe: {path} line {mark.line + 1}: {err.problem}") from None
    except yaml.reader.ReaderError as err:
        raise ConfigError(f"recipe: {path} is not valid YAML: character #x{err.character:04x} at offset {err.position} "
                          "is not allowed in YAML text; remove it") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(filter(None, [getattr(err, "context", None), getattr(err, "problem", None)])) or str(err)
        raise ConfigError(f"recipe: {path} is not valid YAML{where}: {what}") from None
    except (ValueError, OverflowError, RecursionError) as err:
        # a scalar the constructor cannot turn into a value (an integer of 5,000 digits, say)
        raise ConfigError(f"recipe: {path} holds a value YAML cannot read: {type(err).__name__}: {err}") from None
    finally:
        if loader is not None:
            loader.dispose()


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "StrictLoader", "read_text", "load_yaml"]
