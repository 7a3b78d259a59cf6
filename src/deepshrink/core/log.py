"""deepshrink's loggers: ``logging.getLogger("deepshrink")`` and one child per module.

Library code only emits, through ``logging.getLogger(__name__)``: progress and status at INFO,
details at DEBUG. Where the records go is the application's choice: the ``deepshrink`` command
installs a handler for the length of one command (``-q`` / ``-v`` set its level); a Python user
configures ``logging`` as for any library, e.g. ``logging.basicConfig(level=logging.INFO)``.
Importing deepshrink adds no handler and sets no level, on its loggers or anyone else's.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

LOGGER = "deepshrink"


@contextmanager
def scoped_levels(levels: Mapping[str, int]) -> Iterator[None]:
    """Set the level of each named logger for the ``with`` block, then restore what it was.

    For runtimes that log through ``logging`` while we call them (the ONNX exporter's progress);
    a global ``setLevel`` would outlive the call and hide the user's own configuration.
    """
    loggers = {name: logging.getLogger(name) for name in levels}
    previous = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(levels[name])
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(previous[name])
