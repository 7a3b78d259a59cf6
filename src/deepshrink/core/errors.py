"""Typed errors. Every message names what is wrong and how to fix it.

The CLI turns any ``DeepshrinkError`` into one line on stderr and exit code 2.
"""
from __future__ import annotations


class DeepshrinkError(Exception):
    """Base of every error a user can fix by changing their input."""


class ConfigError(DeepshrinkError, ValueError):
    """A config or recipe value is missing, unknown or out of range."""


class DataError(DeepshrinkError):
    """A dataset cannot be found, read or verified."""


class ModelLoadError(DeepshrinkError):
    """A model name, file or checkpoint cannot be turned into a module."""


class ExportError(DeepshrinkError):
    """A model cannot be lowered to the requested runtime format."""


class ArtifactError(DeepshrinkError):
    """An artifact file is unreadable, corrupted or of an unknown kind."""
