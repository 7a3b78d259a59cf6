"""Tiny, fast fixtures: four Gaussian blobs in 8-D, an 8-16-16-4 MLP trained on them once, and a
small LeNet-5 (4 and 6 conv channels) for conv weights. Both come from the zoo, so they can be saved."""
from __future__ import annotations

import copy

import pytest
import torch

from deepshrink.data.splits import from_tensors
from deepshrink.models.zoo import create
from deepshrink.training import TrainConfig, fit


def _blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [-2.0] * 4 + [0.0] * 4, [0.0] * 4 + [-2.0] * 4])
    y = torch.arange(n) % 4
    return centers[y] + 1.5 * torch.randn(n, 8, generator=generator), y


def new_mlp() -> torch.nn.Module:
    """hidden.0 [16, 8], hidden.1 [16, 16], classifier [4, 16]."""
    return create("lenet-300-100", hidden=[16, 16], in_features=8, num_classes=4)


def small_lenet() -> torch.nn.Module:
    """conv1 [4, 1, 5, 5], conv2 [6, 4, 5, 5], fc1 [16, 96], fc2 [10, 16]."""
    torch.manual_seed(0)
    return create("lenet-5", conv1=4, conv2=6, fc1=16)


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """One thread, as in the benchmarks: with two shared cores, multi-threaded backward passes of
    these tiny models spend most of their time waiting for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def _trained_300_100_state(digits):
    torch.manual_seed(0)
    model = create("lenet-300-100")
    fit(model, digits, TrainConfig(epochs=1, lr=1e-3, batch_size=64, seed=0), progress=False)
    return copy.deepcopy(model.state_dict())


@pytest.fixture(scope="module")
def trained(_trained_300_100_state):
    """A full-size LeNet-300-100 trained one epoch on digits, a fresh copy per test module."""
    model = create("lenet-300-100")
    model.load_state_dict(_trained_300_100_state)
    return model.eval()


@pytest.fixture(scope="module")
def batch(digits):
    """200 digits test images."""
    x, _ = next(iter(torch.utils.data.DataLoader(digits.test, batch_size=200)))
    return x


@pytest.fixture(scope="session")
def blobs():
    g = torch.Generator().manual_seed(0)
    return from_tensors("blobs", _blobs(400, g), _blobs(200, g), num_classes=4, val_fraction=0.25, calib_size=32, seed=0)


@pytest.fixture(scope="session")
def _trained_state(blobs):
    torch.manual_seed(0)
    model = new_mlp()
    fit(model, blobs, TrainConfig(epochs=4, lr=1e-2, batch_size=32), progress=False)
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def trained_mlp(_trained_state):
    """A fresh copy per test (tests quantize it in place)."""
    model = new_mlp()
    model.load_state_dict(_trained_state)
    return model.eval()
