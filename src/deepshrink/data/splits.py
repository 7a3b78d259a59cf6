"""The data adapter every stage takes: four splits of ``(inputs, label)`` samples.

``inputs`` is anything ``core.samples`` calls a sample — a tensor, a tuple or a dict of tensors
of any dtype — and ``label`` an int, or ``NO_LABEL`` (-1) for the raw, unlabelled inputs most
users have. Batches come from ``loader``: samples of one shape are stacked; when shapes vary
between samples (token ids, audio frames) and no ``collate`` is given, batches hold one sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from deepshrink.core import samples as S
from deepshrink.core.errors import DataError

NO_LABEL = -1


class SampleSet(Dataset):
    """A list of inputs, with optional integer labels, as a ``Dataset`` of ``(inputs, label)``."""

    def __init__(self, inputs: Sequence[Any], labels: Sequence[int] | torch.Tensor | None = None) -> None:
        self.inputs = list(inputs)
        if labels is not None and len(labels) != len(self.inputs):
            raise DataError(f"labels: {len(labels)} labels for {len(self.inputs)} samples")
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        return self.inputs[i], self.labels[i] if self.labels is not None else torch.tensor(NO_LABEL)


@dataclass(frozen=True)
class DataSplits:
    """Train, validation, test and calibration splits of one dataset.

    ``calib`` is a small subset of ``train`` used to calibrate activation ranges; it never
    overlaps ``val`` or ``test``. ``input_shape`` excludes the batch dimension (the first test
    sample's, when shapes vary). ``labelled``: whether labels exist — without them every figure is
    fidelity against the original model. ``fixed_shape``: all samples have the same shapes.
    ``collate``: a user function batching a list of ``(inputs, label)`` (e.g. padding).
    ``dynamic``: the dimensions that vary besides the batch, ``{input name or position: {dim:
    (min, max)}}`` in batch coordinates — inferred from the samples by ``from_samples``, and the one
    description every capture (quantization, export) reads.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    calib: Dataset
    input_shape: tuple[int, ...]
    num_classes: int | None
    labelled: bool = True
    fixed_shape: bool = True
    collate: Callable | None = None
    dynamic: dict | None = None   # dimensions that vary besides the batch (core.graph): captures and exports take them

    def loader(self, split: str, *, batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> DataLoader:
        dataset = getattr(self, split)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        if self.collate is None and not self.fixed_shape:
            batch_size = 1   # shapes vary: one sample a batch, never padded or cut
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=self.collate or collate)

    def inputs(self, split: str, n: int | None = None) -> list:
        """The first ``n`` inputs of ``split`` (all when ``None``), without labels."""
        dataset = getattr(self, split)
        count = len(dataset) if n is None else min(n, len(dataset))
        return [dataset[i][0] for i in range(count)]

    def batches(self, split: str, *, samples: int | None = None, batch_size: int = 128) -> list:
        """Input batches (no labels) of the first ``samples`` samples of ``split``: consecutive samples
        of one shape share a batch, so varying shapes are neither padded nor cut."""
        if self.collate is not None:
            out, seen = [], 0
            for x, _ in self.loader(split, batch_size=batch_size):
                take = S.batch_size(x) if samples is None else min(S.batch_size(x), samples - seen)
                out.append(S.take(x, 0, take))
                seen += take
                if samples is not None and seen >= samples:
                    break
            return out
        return list(S.batches(self.inputs(split, samples), batch_size))

    def example_input(self, batch: int = 1):
        """A batch of ``batch`` copies of the first test sample (shapes every export is traced with)."""
        x = self.test[0][0]
        return S.stack([x] * batch)

    def example_batch(self, n: int):
        """Up to ``n`` real test samples as one batch; with varying shapes, those shaped like the first."""
        first = self.test[0][0]
        same = [x for x in self.inputs("test", None if not self.fixed_shape else n) if S.shapes(x) == S.shapes(first)]
        return S.stack(same[:n])

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in ("train", "val", "test", "calib")}


def collate(items: list) -> tuple:
    """``(inputs batch, labels)`` from ``(inputs, label)`` items of one shape."""
    inputs = S.stack([x for x, _ in items])
    labels = torch.stack([torch.as_tensor(y, dtype=torch.int64) for _, y in items])
    return inputs, labels


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
    """Bring your own ``torch.utils.data.Dataset`` s of ``(inputs, int label)`` items (inputs: a
    tensor, tuple or dict of tensors). For inputs without labels use ``from_samples``."""
    for where, dataset in (("train", train), ("test", test)):
        if len(dataset) == 0:
            raise DataError(f"from_datasets: the {where} dataset is empty")
        item = dataset[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"from_datasets: {where}[0] is not an (inputs, label) pair; for unlabelled inputs use "
                            "deepshrink.data.from_samples(calib=..., eval=...)")
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
        input_shape=tuple(S.flatten(x0)[0].shape),
        num_classes=num_classes,
        fixed_shape=_fixed_shape([d[i][0] for d in (train, test) for i in range(min(len(d), 256))]),
    )


def _fixed_shape(inputs: list) -> bool:
    first = S.shapes(inputs[0])
    return all(S.shapes(x) == first for x in inputs)


def _call_user(fn: Callable, what: str):
    """What the user's zero-argument function returns; its failure (even ``SystemExit``) as one ``DataError``."""
    try:
        return fn()
    except BaseException as err:  # the user's function may raise anything
        if isinstance(err, KeyboardInterrupt):
            raise
        raise DataError(f"data.{what}: calling {getattr(fn, '__name__', fn)!r} failed: {type(err).__name__}: {err}") from None


def _resolve(source, what: str) -> list | None:
    """A list of samples, or what a zero-argument callable returns."""
    if source is None:
        return None
    if callable(source) and not isinstance(source, (list, tuple, Dataset)):
        source = _call_user(source, what)
    if isinstance(source, Dataset) and not isinstance(source, (list, tuple)):
        source = [source[i] for i in range(len(source))]
    if not isinstance(source, (list, tuple)):
        raise DataError(f"data.{what}: expected a list of samples (tensors, tuples or dicts of tensors), got {type(source).__name__}")
    return list(source)


def from_samples(
    *,
    calib: Sequence[Any] | Callable[[], Sequence[Any]],
    eval: Sequence[Any] | Callable[[], Sequence[Any]],
    train: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    labels: dict[str, Sequence[int]] | None = None,
    batch_dim: bool = False,
    collate: Callable | None = None,
    dynamic: dict | None = None,
    name: str = "samples",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """Your own raw inputs, labels optional: ``from_samples(calib=[...], eval=[...])``.

    Each sample is a tensor, a tuple or a dict of tensors of any dtype, *without* a batch
    dimension (``batch_dim=True``: each has a batch dimension of 1, removed here — what a
    tokenizer's ``return_tensors="pt"`` gives). ``calib`` calibrates (and, without ``train``,
    fine-tunes by distillation); ``eval`` is held out and scores every variant — against labels
    when ``labels["eval"]`` is given, else as fidelity to the original model. Each argument may be
    a zero-argument callable returning the list. Every sample must have the structure of the
    first (keys, dtypes, ranks); shapes may vary: the dimensions that do become ``dynamic`` (range
    = the sizes seen) unless ``dynamic`` names them and their ranges, e.g. ``{"input_ids": {1: (2, 128)}}``.
    """
    resolved = {"calib": _resolve(calib, "calib"), "eval": _resolve(eval, "eval"), "train": _resolve(train, "train")}
    labels = labels or {}
    unknown = set(labels) - {"calib", "eval", "train"}
    if unknown:
        raise DataError(f"labels: unknown split {sorted(unknown)[0]!r}; use calib, eval or train")
    reference = None
    for what, items in resolved.items():
        if items is None:
            continue
        if batch_dim:
            items = [_unbatch(x, f"data.{what}[{i}]") for i, x in enumerate(items)]
            resolved[what] = items
        structure = S.check_samples(items, what=f"data.{what}")
        if reference is None:
            reference = (what, structure)
        elif structure != reference[1]:
            raise DataError(f"data.{what} samples are {S.describe(structure)} but data.{reference[0]} samples are "
                            f"{S.describe(reference[1])}; all splits must feed the model the same way")
    for what, ys in labels.items():
        if resolved.get(what) is not None and len(ys) != len(resolved[what]):
            raise DataError(f"labels[{what!r}]: {len(ys)} labels for {len(resolved[what])} samples; give one label per sample")
        negative = next((i for i, y in enumerate(ys) if int(y) < 0), None)
        if negative is not None:
            raise DataError(f"labels[{what!r}][{negative}] is {int(ys[negative])}; class labels are 0, 1, 2, ...")
    labelled = "eval" in labels
    if labelled and any(s not in labels for s in ("calib", "train") if resolved[s] is not None):
        raise DataError("labels: with labels for eval, give them for calib (and train) too, or for none")
    sets = {what: SampleSet(items, labels.get(what)) for what, items in resolved.items() if items is not None}
    train_set = sets.get("train", sets["calib"])
    val_idx, train_idx = seeded_split(len(train_set), (val_fraction, 1.0 - val_fraction), seed)
    if len(train_set) >= 10 and len(val_idx):
        train_split, val_split = Subset(train_set, train_idx.tolist()), Subset(train_set, val_idx.tolist())
    else:
        train_split = val_split = train_set
    all_inputs = [x for items in resolved.values() if items for x in items]
    num_classes = None
    if labelled:
        num_classes = 1 + max(int(y) for ys in labels.values() for y in ys)
    first = S.flatten(resolved["eval"][0])[0]
    from deepshrink.core.graph import varying_dims

    varying = varying_dims(all_inputs) if dynamic is None else dynamic
    return DataSplits(
        name=name, train=train_split, val=val_split, test=sets["eval"], calib=sets["calib"],
        input_shape=tuple(first.shape), num_classes=num_classes, labelled=labelled,
        fixed_shape=_fixed_shape(all_inputs), collate=_guarded_collate(collate) if collate else None,
        dynamic=varying or None,
    )


def _guarded_collate(fn: Callable) -> Callable:
    """The user's collate function, its failure (even ``SystemExit``) one ``DataError``."""
    def collate_with(items: list):
        try:
            return fn(items)
        except BaseException as err:  # the user's function may raise anything
            if isinstance(err, KeyboardInterrupt):
                raise
            raise DataError(f"data.collate: {getattr(fn, '__name__', fn)!r} failed on a batch of {len(items)} samples: "
                            f"{type(err).__name__}: {err}") from None

    return collate_with


def from_spec_functions(*, calib: Callable, eval: Callable, train: Callable | None = None, **options: Any) -> DataSplits:
    """``from_samples`` from functions that each return a list of samples, or a ``(samples, labels)`` pair."""
    resolved, labels = {}, {}
    for what, fn in (("calib", calib), ("eval", eval), ("train", train)):
        if fn is None:
            continue
        out = _call_user(fn, what)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (list, tuple)) and not isinstance(out[0], torch.Tensor) \
                and len(out[0]) == len(out[1]) and all(isinstance(y, (int, torch.Tensor)) for y in out[1]):
            out, labels[what] = list(out[0]), [int(y) for y in out[1]]
        if not isinstance(out, (list, tuple)):
            raise DataError(f"data.{what}: {getattr(fn, '__name__', fn)!r} returned a {type(out).__name__}; return a list of "
                            "samples (tensors, tuples or dicts of tensors), or a (samples, labels) pair")
        resolved[what] = list(out)
    return from_samples(calib=resolved["calib"], eval=resolved["eval"], train=resolved.get("train"),
                        labels=labels or None, **options)


def _unbatch(inputs, where: str):
    def squeeze(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0 or t.shape[0] != 1:
            raise DataError(f"{where}: batch_dim=True needs a leading dimension of 1, got shape {tuple(t.shape)}")
        return t[0]
    return S.map_tensors(squeeze, inputs)
