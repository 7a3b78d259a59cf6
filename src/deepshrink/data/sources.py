"""Named datasets: ``digits`` (embedded in scikit-learn), ``mnist``, ``fashion-mnist`` (IDX files)."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from deepshrink.core.errors import DataError
from deepshrink.data import idx
from deepshrink.data.splits import DataSplits, from_tensors, seeded_split

# (mean, std) of the training pixels in [0, 1]; fixed so every run normalizes identically
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530), "digits": (0.3063, 0.3252)}


def _normalize(images_01: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    return ((images_01 - mean) / std).unsqueeze(1).contiguous()


def load_digits(*, image_size: int = 28, seed: int = 0, calib_size: int = 256, **_: object) -> DataSplits:
    """scikit-learn's 1,797 8x8 digits, resized (bilinear) to ``image_size``; 20 % held out as test."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    if image_size != 8:
        images = torch.nn.functional.interpolate(images.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False).squeeze(1)
    x = _normalize(images, "digits")
    y = torch.from_numpy(bunch.target.astype(np.int64))
    test_idx, train_idx = seeded_split(len(y), (0.2, 0.8), seed)
    return from_tensors(
        "digits", (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]),
        num_classes=10, val_fraction=0.1, calib_size=calib_size, seed=seed,
    )


def _idx_loader(name: str) -> Callable[..., DataSplits]:
    def load_idx(
        *, data_dir: str | os.PathLike | None = None, download: bool = False, seed: int = 0,
        calib_size: int = 512, image_size: int = 28, **_: object,
    ) -> DataSplits:
        if image_size != 28:   # before reading 50 MB
            raise DataError(f"{name}: image_size {image_size} is not supported; {name} images are 28x28")
        directory = idx.locate(name, data_dir, download=download)
        kinds = (idx.IMAGES, idx.LABELS, idx.IMAGES, idx.LABELS)   # the order of idx.FILES
        arrays = {f: idx.read_idx(directory / f, kind=k) for f, k in zip(idx.FILES, kinds)}
        train_x, train_y, test_x, test_y = (arrays[f] for f in idx.FILES)
        for images, labels in (idx.FILES[:2], idx.FILES[2:]):   # every fault found now, not after minutes of training
            idx.check_split(directory / images, directory / labels, arrays[images], arrays[labels], side=28, num_classes=10)

        def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            return _normalize(torch.from_numpy(images.astype(np.float32) / 255.0), name), torch.from_numpy(labels.astype(np.int64))

        # the official 10,000-image test split stays whole; validation comes out of train
        return from_tensors(
            name, tensors(train_x, train_y), tensors(test_x, test_y),
            num_classes=10, val_fraction=5000 / 60000, calib_size=calib_size, seed=seed,
        )

    return load_idx


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "mnist": _idx_loader("mnist"),
    "fashion-mnist": _idx_loader("fashion-mnist"),
}


def load(name: str, **options: object) -> DataSplits:
    """``load("mnist", data_dir="../shared/data/mnist")`` -> ``DataSplits``."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise DataError(f"data: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or pass your own Dataset via deepshrink.data.from_datasets") from None
    return loader(**options)
