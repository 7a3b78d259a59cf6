"""The data adapter every stage takes: four splits of (image, label) samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


@dataclass(frozen=True)
class DataSplits:
    """Train, validation, test and calibration splits of one dataset.

    ``calib`` is a small subset of ``train`` used to calibrate activation ranges; it never
    overlaps ``val`` or ``test``. ``input_shape`` excludes the batch dimension.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    calib: Dataset
    input_shape: tuple[int, ...]
    num_classes: int

    def loader(self, split: str, *, batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> DataLoader:
        dataset = getattr(self, split)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        x, _ = self.test[0]
        return x.unsqueeze(0).expand(batch, *x.shape).contiguous()

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in ("train", "val", "test", "calib")}


def seeded_split(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of the given fractions of ``range(n)``; the last takes the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for i, frac in enumerate(fractions):
        stop = n if i == len(fractions) - 1 else start + round(frac * n)
        parts.append(perm[start:stop])
        start = stop
    return parts


def from_tensors(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    val_fraction: float,
    calib_size: int,
    seed: int,
) -> DataSplits:
    """Split ``train`` into train/val by a seeded permutation; calib is the first train samples."""
    n = train[0].shape[0]
    val_idx, train_idx = seeded_split(n, (val_fraction, 1.0 - val_fraction), seed)
    train_ds = TensorDataset(train[0][train_idx], train[1][train_idx])
    val_ds = TensorDataset(train[0][val_idx], train[1][val_idx])
    calib_ds = Subset(train_ds, range(min(calib_size, len(train_ds))))
    return DataSplits(
        name=name,
        train=train_ds,
        val=val_ds,
        test=TensorDataset(*test),
        calib=calib_ds,
        input_shape=tuple(train[0].shape[1:]),
        num_classes=num_classes,
    )


def from_datasets(
    train: Dataset,
    test: Dataset,
    *,
    val: Dataset | None = None,
    calib_size: int = 256,
    num_classes: int | None = None,
    name: str = "custom",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """Bring your own ``torch.utils.data.Dataset`` s (samples are ``(tensor, int label)``)."""
    if val is None:
        val_idx, train_idx = seeded_split(len(train), (val_fraction, 1.0 - val_fraction), seed)
        train, val = Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist())
    x0, _ = train[0]
    if num_classes is None:
        num_classes = 1 + max(int(test[i][1]) for i in range(len(test)))
    return DataSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        calib=Subset(train, range(min(calib_size, len(train)))),
        input_shape=tuple(x0.shape),
        num_classes=num_classes,
    )
