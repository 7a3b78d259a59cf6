"""Lowering to the device runtimes, with a parity check in the runtime after every export."""
from deepshrink.deploy.api import ExportResult, export

__all__ = ["export", "ExportResult"]
