"""Tiny, fast fixtures: four Gaussian blobs in 8-D and an 8-16-16-4 MLP trained on them once."""
from __future__ import annotations

import copy

import pytest
import torch

from deepshrink.data.splits import from_tensors
from deepshrink.models.zoo import MLP
from deepshrink.training import TrainConfig, fit


def _blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [-2.0] * 4 + [0.0] * 4, [0.0] * 4 + [-2.0] * 4])
    y = torch.arange(n) % 4
    return centers[y] + 1.5 * torch.randn(n, 8, generator=generator), y


@pytest.fixture(scope="session")
def blobs():
    g = torch.Generator().manual_seed(0)
    return from_tensors("blobs", _blobs(400, g), _blobs(100, g), num_classes=4, val_fraction=0.25, calib_size=32, seed=0)


@pytest.fixture(scope="session")
def _trained_state(blobs):
    torch.manual_seed(0)
    model = MLP(hidden=(16, 16), in_features=8, num_classes=4)
    fit(model, blobs, TrainConfig(epochs=4, lr=1e-2, batch_size=32), progress=False)
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def trained_mlp(_trained_state):
    """A fresh copy per test (tests prune it in place): hidden.0 [16, 8], hidden.1 [16, 16], classifier [4, 16]."""
    model = MLP(hidden=(16, 16), in_features=8, num_classes=4)
    model.load_state_dict(_trained_state)
    return model.eval()
