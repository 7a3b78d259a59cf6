"""Configs are frozen dataclasses of plain data that round-trip through dicts (and so YAML/JSON).

``from_dict`` validates while it builds: an unknown key or a value of the wrong kind raises a
``ConfigError`` whose message starts with the key's path (``stages[2].prune.sparsity``) and lists
what is allowed.
"""
from __future__ import annotations

import contextvars
import dataclasses
import difflib
import enum
import math
import re
import reprlib
import types
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from deepshrink.core.errors import ConfigError

T = TypeVar("T")


def to_dict(config: Any) -> Any:
    """Plain-data view of a config: dataclasses become dicts, enums their values, tuples lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): to_dict(v) for k, v in config.items()}
    return config


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build ``cls`` from plain data, checking every key and value.

    Every fault is collected before raising: one ``ConfigError`` whose ``problems`` list each
    one with its key path (a wrong type, an unknown or missing key, and each failed ``check``
    of every ``__post_init__``).
    """
    return _convert(cls, data, path or cls.__name__)


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """``"; did you mean 'mnist'?"`` when ``value`` is a near miss of one of ``choices``, else ``""``."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else ""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def short_repr(value: Any) -> str:
    """``repr`` cut to a line's worth: an error message must not echo a megabyte of YAML."""
    return _REPR.repr(value)


# ``check`` inside ``from_dict`` collects here instead of raising, so one pass reports every range error
_PENDING: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("deepshrink_config_pending", default=None)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1:
            return f"a list of {len(args)}: [{', '.join(_describe(a) for a in args)}]"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_describe(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "values"
    return getattr(tp, "__name__", str(tp))


def _problems(err: ConfigError) -> list[str]:
    return list(err.problems) or [str(err)]


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: {short_repr(value)} is not {_describe(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if not isinstance(value, (str, int, float, bool, type(None))) or value not in allowed:
            raise ConfigError(f"{path}: {short_repr(value)} is not allowed; choose one of {', '.join(map(repr, allowed))}"
                              + did_you_mean(value, [a for a in allowed if isinstance(a, str)]))
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{path}: {short_repr(value)} is not allowed; choose one of {_describe(tp)}"
                              + did_you_mean(value, [str(m.value) for m in tp])) from None
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {short_repr(value)}")
        args = get_args(tp)
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {_describe(tp)}, got {len(value)} values: {short_repr(value)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items, problems = [], []
        for i, (item_type, v) in enumerate(zip(item_types, value)):
            try:
                items.append(_convert(item_type, v, f"{path}[{i}]"))
            except ConfigError as err:
                problems += _problems(err)
        if problems:
            raise ConfigError(*problems)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {short_repr(value)}")
        _, vt = get_args(tp)
        converted, problems = {}, []
        for k, v in value.items():
            try:
                converted[str(k)] = _convert(vt, v, f"{path}.{k}")
            except ConfigError as err:
                problems += _problems(err)
        if problems:
            raise ConfigError(*problems)
        return converted
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {short_repr(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{path}: {short_repr(value)} is too large; must be a finite number") from None
        if not math.isfinite(number):
            # inf and nan pass every `x > 0` / `x < 1` check (or none) and then poison training silently
            raise ConfigError(f"{path}: must be a finite number, got {short_repr(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {short_repr(value)}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # pragma: no cover - programming error


def _convert_dataclass(tp: type, value: Any, path: str) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, "
                          f"got {short_repr(value)}")
    hints = get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
    moved = getattr(tp, "MOVED_KEYS", {})   # keys of an earlier release: say where they went
    problems = [_moved(tp, path, k, moved[k], value[k]) if k in moved else
                f"{path}.{k}: unknown key; allowed keys: {', '.join(fields)}{did_you_mean(k, fields)}"
                for k in value if k not in fields]
    kwargs, failed = {}, set()
    for name in fields:
        if name in value:
            try:
                kwargs[name] = _convert(hints[name], value[name], f"{path}.{name}")
            except ConfigError as err:
                problems += _problems(err)
                failed.add(name)
    missing = [n for n, f in fields.items()
               if n not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    problems += [f"{path}.{n}: required key is missing" for n in missing]
    if missing:
        raise ConfigError(*problems)
    # the range checks still run on the fields that converted (a failed one takes its default,
    # and what the checks say about that default is dropped), so one pass reports every fault
    pending: list[str] = []
    token = _PENDING.set(pending)
    built = None
    try:
        built = tp(**kwargs)
    except ConfigError as err:
        pending += _problems(err)
    except Exception:
        # a check that failed (and was only recorded) let __post_init__ go on with the bad value
        if not (pending or problems):
            raise
    finally:
        _PENDING.reset(token)
    problems += [f"{path}.{p}" for p in pending if re.split(r"[.\[:]", p, maxsplit=1)[0] not in failed]
    if problems:
        raise ConfigError(*_first_per_key(problems))
    return built


def _moved(tp: type, path: str, key: str, new: str, value: Any) -> str:
    head, _, tail = new.partition(".")
    written = {tail: value}
    # a block written out starts from its class's defaults, not from this config's default block: keep what differs
    field = next((f for f in dataclasses.fields(tp) if f.name == head), None)
    default = None if field is None else (field.default_factory() if field.default_factory is not dataclasses.MISSING
                                          else field.default)
    if dataclasses.is_dataclass(default):
        plain = type(default)()
        written = {**{f.name: to_dict(getattr(default, f.name)) for f in dataclasses.fields(default)
                      if getattr(default, f.name) != getattr(plain, f.name)}, **written}
    block = ", ".join(f"{k}: {short_repr(v)}" for k, v in written.items())
    return f"{path}.{key}: moved to {new}; write {head}: {{{block}}}"


def _first_per_key(problems: Iterable[str]) -> list[str]:
    """One problem per key path: a check that follows from a failed one adds noise, not news."""
    seen: dict[str, str] = {}
    for problem in problems:
        seen.setdefault(problem.partition(": ")[0], problem)
    return list(seen.values())


def check(condition: bool, field: str, message: str) -> None:
    """Range check for ``__post_init__``: raises ``ConfigError('field: message')`` (inside ``from_dict``,
    records it so that every failed check is reported together)."""
    if not condition:
        pending = _PENDING.get()
        if pending is None:
            raise ConfigError(f"{field}: {message}")
        pending.append(f"{field}: {message}")


__all__ = ["to_dict", "from_dict", "check", "did_you_mean", "short_repr"]
