"""Dispatch from a config type to its private handler.

Adding an algorithm adds a config dataclass and registers one handler; entry points never change.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

H = TypeVar("H", bound=Callable[..., Any])


class Registry(Generic[H]):
    def __init__(self, verb: str) -> None:
        self.verb = verb
        self._handlers: dict[type, H] = {}

    def register(self, config_type: type) -> Callable[[H], H]:
        def decorate(handler: H) -> H:
            if config_type in self._handlers:
                raise RuntimeError(f"{self.verb}: a handler for {config_type.__name__} is already registered")
            self._handlers[config_type] = handler
            return handler

        return decorate

    def handler_for(self, config: object) -> H:
        for klass in type(config).__mro__:
            if klass in self._handlers:
                return self._handlers[klass]
        from deepshrink.core.errors import ConfigError

        known = ", ".join(sorted(k.__name__ for k in self._handlers))
        raise ConfigError(f"{self.verb}: no handler for {type(config).__name__}; known configs: {known}")

    def __contains__(self, config_type: type) -> bool:
        return config_type in self._handlers
