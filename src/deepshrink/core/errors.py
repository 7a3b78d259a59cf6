"""Typed errors. Every message names what is wrong and how to fix it.

The CLI turns any ``DeepshrinkError`` into one line on stderr and exit code 2.
"""
from __future__ import annotations


class DeepshrinkError(Exception):
    """Base of every error a user can fix by changing their input."""


class ConfigError(DeepshrinkError, ValueError):
    """A config or recipe value is missing, unknown or out of range.

    ``problems``: every fault found, each ``key.path: what is wrong; the fix`` on one line.
    Validation collects them all before raising (``ConfigError(*problems)``); the message is
    ``"3 problems: a; b; c"`` (just ``a`` for one), so the CLI still prints one line.
    """

    def __init__(self, *problems: str) -> None:
        # a newline would break the CLI's one-line error (a user file's exception may carry several)
        self.problems: tuple[str, ...] = tuple(" ".join(str(p).splitlines()) for p in problems)
        count = f"{len(self.problems)} problems: " if len(self.problems) > 1 else ""
        super().__init__(count + "; ".join(self.problems))


class DataError(DeepshrinkError):
    """A dataset cannot be found, read or verified."""


class ModelLoadError(DeepshrinkError):
    """A model name, file or checkpoint cannot be turned into a module."""


class ExportError(DeepshrinkError):
    """A model cannot be lowered to the requested runtime format."""


class ArtifactError(DeepshrinkError):
    """An artifact file is unreadable, corrupted or of an unknown kind."""
