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
import zlib
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


IMAGES, LABELS = 2051, 2049   # IDX magic: unsigned bytes, 3 dimensions / 1 dimension
MAX_ITEMS = 10_000_000        # far above any IDX dataset: a larger count is a corrupted header
MAX_SIDE = 1024


def read_idx(path: Path, *, kind: int | None = None) -> np.ndarray:
    """Decode one gzip-compressed IDX file (uint8 images ``[N, rows, cols]`` or labels ``[N]``).

    ``kind``: ``IMAGES`` or ``LABELS``, what the file must hold. The header is read first and
    bounds what is inflated (a gzip bomb stops there); a bad gzip or deflate stream, a truncated
    or over-long payload, or the wrong kind of file is a ``DataError`` naming the file."""
    fix = "re-download it or check --data-dir"
    try:
        with gzip.open(path, "rb") as handle:
            header = handle.read(8)
            if len(header) < 8:
                raise DataError(f"{path}: IDX file is truncated ({len(header)} bytes, the header alone is 8); {fix}")
            magic, n = struct.unpack(">II", header)
            if magic not in (IMAGES, LABELS):
                raise DataError(f"{path}: bad IDX magic {magic}; expected {LABELS} (labels) or {IMAGES} (images); {fix}")
            if kind is not None and magic != kind:
                found, wanted = ("labels", "images") if magic == LABELS else ("images", "labels")
                raise DataError(f"{path}: holds {found} (IDX magic {magic}) where {wanted} belong (magic {kind}): "
                                f"are the image and label files swapped? {fix}")
            shape: tuple[int, ...] = (n,)
            if magic == IMAGES:
                dims = handle.read(8)
                if len(dims) < 8:
                    raise DataError(f"{path}: IDX image header is truncated; {fix}")
                shape = (n, *struct.unpack(">II", dims))
            if n > MAX_ITEMS or any(d > MAX_SIDE for d in shape[1:]):
                raise DataError(f"{path}: IDX header claims shape {list(shape)}, beyond any dataset "
                                f"(at most {MAX_ITEMS} items of {MAX_SIDE}x{MAX_SIDE}); the file is corrupted; {fix}")
            expected = int(np.prod(shape))
            payload = handle.read(expected)
            extra = handle.read(1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip IDX file ({type(err).__name__}: {err}); {fix}") from None
    if len(payload) != expected or extra:
        what = f"{len(payload)} bytes" if len(payload) != expected else "more bytes"
        raise DataError(f"{path}: IDX payload has {what}, header says {expected} ({list(shape)}); the file is "
                        f"truncated or corrupted; {fix}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def check_split(images_path: Path, labels_path: Path, images: np.ndarray, labels: np.ndarray, *,
                side: int, num_classes: int) -> None:
    """``DataError`` unless images and labels pair up: same count, ``side x side`` pixels, labels in range."""
    if images.shape[1:] != (side, side):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, this dataset's are "
                        f"{side}x{side}; the file belongs to another dataset or is corrupted")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
                        "the two files come from different downloads: re-download both")
    if labels.size and int(labels.max()) >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad} is outside the {num_classes} classes "
                        f"0..{num_classes - 1}; the file is corrupted or from another dataset: re-download it")


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
        f"pass data_dir=DIR (CLI: --data-dir DIR) holding {', '.join(FILES[:1])} etc., set DEEPSHRINK_DATA, or download=True (recipe: download: true)"
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
