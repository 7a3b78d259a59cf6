"""Dense MNIST baselines shared by the benchmarks, trained once and cached in bench/.cache/.

    .venv/bin/python bench/baselines.py          # trains any that are missing, prints test error
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from common import REPO, SHARED_DATA

CACHE = REPO / "bench" / ".cache"

# Adam + cosine decay; no augmentation (as in the papers' MNIST setups)
RECIPES = {
    "lenet-300-100": dict(epochs=30, lr=1e-3, batch_size=128, weight_decay=0.0),
    "lenet-5": dict(epochs=4, lr=1e-3, batch_size=64, weight_decay=0.0),
}


def mnist():
    from deepshrink.data import load

    return load("mnist", data_dir=SHARED_DATA / "mnist")


def dense_baseline(name: str, data=None) -> tuple[torch.nn.Module, float]:
    """(trained model, test error in %) — from the cache when present."""
    from deepshrink.models import create, load, save_checkpoint
    from deepshrink.training import TrainConfig, accuracy, fit

    data = data or mnist()
    path = CACHE / f"{name}-dense.safetensors"
    if path.is_file():
        model = load(path)
    else:
        torch.set_num_threads(1)
        torch.manual_seed(0)   # the initial weights too: the same baseline on every machine
        model = create(name)
        started = time.perf_counter()
        fit(model, data, TrainConfig(**RECIPES[name], seed=0), progress=False)
        print(f"trained {name} in {time.perf_counter() - started:.0f} s")
        save_checkpoint(model, path)
    error = 100 * (1 - accuracy(model, data.loader("test", batch_size=1000)))
    return model, error


if __name__ == "__main__":
    data = mnist()
    for name in RECIPES:
        _, err = dense_baseline(name, data)
        print(f"{name}: dense test error {err:.2f} %")
