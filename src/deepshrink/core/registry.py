"""Dispatch from a config type to its private handler, and the names recipes use for the configs.

Adding an algorithm adds a config dataclass and registers one handler; entry points never change.
A registration may give the config a ``name`` (``"magnitude"``, ``"int8-static"``): a recipe's
``method:`` / ``scheme:`` key is that name, looked up here, so the registry is the one table of
what exists.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

H = TypeVar("H", bound=Callable[..., Any])


class Registry(Generic[H]):
    def __init__(self, verb: str) -> None:
        self.verb = verb
        self._handlers: dict[type, H] = {}
        self._names: dict[str, type] = {}

    def register(self, config_type: type, *, name: str | None = None) -> Callable[[H], H]:
        def decorate(handler: H) -> H:
            if config_type in self._handlers:
                raise RuntimeError(f"{self.verb}: a handler for {config_type.__name__} is already registered")
            if name is not None and name in self._names:
                raise RuntimeError(f"{self.verb}: the name {name!r} already names {self._names[name].__name__}")
            self._handlers[config_type] = handler
            if name is not None:
                self._names[name] = config_type
            return handler

        return decorate

    def handler_for(self, config: object) -> H:
        for klass in type(config).__mro__:
            if klass in self._handlers:
                return self._handlers[klass]
        from deepshrink.core.errors import ConfigError

        known = ", ".join(sorted(k.__name__ for k in self._handlers))
        raise ConfigError(f"{self.verb}: no handler for {type(config).__name__}; known configs: {known}")

    def names(self) -> dict[str, type]:
        """``{name: config type}`` of the configs registered with a name, in registration order."""
        return dict(self._names)

    def name_of(self, config: object) -> str:
        """The registered name of ``type(config)`` (exactly that type, not a base)."""
        for name, klass in self._names.items():
            if type(config) is klass:
                return name
        raise KeyError(f"{self.verb}: {type(config).__name__} is registered without a name")

    def configs(self) -> list[type]:
        """Every config type with a handler, in registration order."""
        return list(self._handlers)

    def __contains__(self, config_type: type) -> bool:
        return config_type in self._handlers
