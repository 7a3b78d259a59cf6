"""IDX files (MNIST's format): read, locate, verify and optionally download.

Search order for a dataset's directory: the ``data_dir`` argument, ``$DEEPSHRINK_DATA/<name>``,
then ``~/.cache/deepshrink/<name>``. Downloads happen only when asked, and every downloaded file
must match the MD5 its authors publish before it is kept.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepshrink.core.errors import DataError
from deepshrink.core.io import atomic_write_bytes

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class IdxSource:
    name: str
    mirrors: tuple[str, ...]
    md5: dict[str, str]


SOURCES = {
    "mnist": IdxSource(
        "mnist",
        ("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": IdxSource(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}


def read_idx(path: Path) -> np.ndarray:
    """Decode one gzip-compressed IDX file (uint8 images ``[N, rows, cols]`` or labels ``[N]``)."""
    try:
        raw = gzip.open(path, "rb").read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable gzip IDX file ({err}); re-download it or check --data-dir") from None
    if len(raw) < 8:
        raise DataError(f"{path}: IDX file is truncated ({len(raw)} bytes)")
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 2049:
        header, shape = 8, (n,)
    elif magic == 2051 and len(raw) >= 16:
        rows, cols = struct.unpack(">II", raw[8:16])
        header, shape = 16, (n, rows, cols)
    else:
        raise DataError(f"{path}: bad IDX magic {magic}; expected 2049 (labels) or 2051 (images)")
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX payload has {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("DEEPSHRINK_DATA"):
        dirs.append(Path(os.environ["DEEPSHRINK_DATA"]) / name)
    dirs.append(Path.home() / ".cache" / "deepshrink" / name)
    return dirs


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def locate(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The directory holding all four IDX files of ``name``; downloads them if asked."""
    source = SOURCES[name]
    dirs = candidate_dirs(name, data_dir)
    for d in dirs:
        if all((d / f).is_file() for f in FILES):
            return d
    if download:
        return fetch(source, dirs[0])
    tried = ", ".join(str(d) for d in dirs)
    missing = [f for f in FILES if not (dirs[0] / f).is_file()]
    raise DataError(
        f"{name}: IDX files not found (looked in {tried}; missing {missing[0]}); "
        f"pass --data-dir DIR holding {', '.join(FILES[:1])} etc., set DEEPSHRINK_DATA, or add --download"
    )


def fetch(source: IdxSource, directory: Path) -> Path:
    """Download the four files from the first mirror that answers, checking each MD5."""
    directory.mkdir(parents=True, exist_ok=True)
    for fname in FILES:
        target = directory / fname
        if target.is_file() and md5_of(target) == source.md5[fname]:
            continue
        errors = []
        for mirror in source.mirrors:
            try:
                with urllib.request.urlopen(mirror + fname, timeout=60) as response:
                    payload = response.read()
            except OSError as err:
                errors.append(f"{mirror}: {err}")
                continue
            digest = hashlib.md5(payload).hexdigest()
            if digest != source.md5[fname]:
                errors.append(f"{mirror}: MD5 {digest} != published {source.md5[fname]}")
                continue
            atomic_write_bytes(target, payload)
            break
        else:
            raise DataError(f"{source.name}: could not download {fname} ({'; '.join(errors)}); copy the files by hand into {directory}")
    return directory
