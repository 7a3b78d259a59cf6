"""Atomic file writes: a crash never leaves a half-written artifact behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays the target's: some writers (torch.export.save) check it
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{target.name}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def writable_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory this process can create files in (made if missing), checked with a
    probe file up front; ``ConfigError`` saying why not and what to do, before any work is done."""
    from deepshrink.core.errors import ConfigError

    target = Path(path)
    fix = "choose another output directory (--out DIR)"
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output directory {target}: it is a file, not a directory; {fix}")
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"output directory {target}: a part of that path is a file, not a directory; {fix}") from None
    except PermissionError:
        raise ConfigError(f"output directory {target}: this user may not create files there (permission denied); "
                          f"{fix}") from None
    except OSError as err:
        raise ConfigError(f"output directory {target}: cannot create files there ({err.strerror or err}); {fix}") from None
    return target
