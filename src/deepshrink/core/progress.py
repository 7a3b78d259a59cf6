"""Progress of long loops: a bar in a terminal, a log line now and then elsewhere, nothing when quiet.

Every long loop (training steps, calibration, sensitivity sweeps, evaluation batches) goes
through ``progress``, so one rule decides what the user sees:

- stderr is a terminal and the ``deepshrink`` logger shows INFO (the CLI's default; ``-q`` raises
  it to WARNING) or nobody configured logging at all (a Python user at a prompt): a tqdm bar on
  stderr that disappears when the loop ends;
- stderr is not a terminal (CI logs, a redirected run): an INFO line through the ``deepshrink``
  logger every ``every`` seconds, so a loop that finishes quickly adds nothing;
- otherwise nothing.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

LINE_EVERY_S = 30.0


def progress(iterable: Iterable, desc: str, total: int | None = None, *, enabled: bool | None = None,
             every: float | None = None):
    """``iterable``, reporting its progress as ``desc`` (see the module doc).

    ``enabled``: ``True`` always draws a bar, ``False`` never reports, ``None`` decides as above.
    The result iterates like ``iterable`` and has tqdm's ``set_postfix`` (a no-op without a bar).
    """
    if total is None:
        total = _length(iterable)
    if enabled is False:
        return _Lines(iterable, desc, total, every=None)
    if enabled or (_terminal() and _shows_info()):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)
    return _Lines(iterable, desc, total, every=LINE_EVERY_S if every is None else every)


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed stderr
        return False


def _shows_info() -> bool:
    ours = logging.getLogger("deepshrink")
    if ours.isEnabledFor(logging.INFO):
        return True
    # nothing configured anywhere: the bar is the only progress a Python user can see
    root = logging.getLogger()
    return ours.level == logging.NOTSET and not root.handlers and root.level == logging.WARNING


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class _Lines:
    """The iterable, with an INFO line every ``every`` seconds (``None``: silent)."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, *, every: float | None) -> None:
        self.iterable, self.desc, self.total, self.every = iterable, desc, total, every
        self.postfix: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def __iter__(self) -> Iterator:
        if self.every is None:
            yield from self.iterable
            return
        start = last = time.monotonic()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.every:
                last = now
                log.info("%s", self.line(done, now - start))

    def line(self, done: int, elapsed: float) -> str:
        text = f"{self.desc}: {done}"
        if self.total:
            text += f"/{self.total} ({100 * done / self.total:.0f} %)"
        text += f", {_duration(elapsed)}"
        if self.total and 0 < done < self.total:
            text += f", ~{_duration(elapsed * (self.total - done) / done)} left"
        if self.postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["LINE_EVERY_S", "progress"]
