"""``TrainConfig.random_shift``: each training image moved by its own whole-pixel offset, edges
replicated; refused with the fix for inputs that are not images."""
import pytest
import torch
from torch import nn

from deepshrink.core.errors import ConfigError
from deepshrink.data.splits import from_tensors
from deepshrink.training import TrainConfig, fit
from deepshrink.training.loop import random_shift


def test_each_sample_is_its_own_window_of_the_edge_replicated_image():
    x = torch.arange(3 * 2 * 5 * 6, dtype=torch.float32).reshape(3, 2, 5, 6)
    torch.manual_seed(7)
    moved = random_shift(x, 2)
    torch.manual_seed(7)
    dy, dx = torch.randint(0, 5, (3,)), torch.randint(0, 5, (3,))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    assert moved.shape == x.shape
    for n in range(3):
        assert torch.equal(moved[n], padded[n, :, dy[n]:dy[n] + 5, dx[n]:dx[n] + 6])
    assert not torch.equal(moved, x)          # seed 7 moves at least one of the three


def test_offsets_cover_the_whole_range_and_a_centred_window_is_the_image():
    x = torch.randn(400, 1, 4, 4)
    torch.manual_seed(0)
    moved = random_shift(x, 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    seen = set()
    for n in range(400):
        for dy in range(3):
            for dx in range(3):
                if torch.equal(moved[n], padded[n, :, dy:dy + 4, dx:dx + 4]):
                    seen.add((dy - 1, dx - 1))
    assert seen == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    unmoved = [n for n in range(400) if torch.equal(moved[n], x[n])]
    assert 20 < len(unmoved) < 80             # 1 in 9 of 400 is 44


def splits(inputs: torch.Tensor, labels: torch.Tensor):
    return from_tensors("t", (inputs, labels), (inputs[:8], labels[:8]), num_classes=3, val_fraction=0.25,
                        calib_size=8, seed=0)


def test_training_with_shifts_is_deterministic_and_differs_from_training_without():
    g = torch.Generator().manual_seed(0)
    data = splits(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))

    def trained(shift: int) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        fit(model, data, TrainConfig(epochs=2, batch_size=16, random_shift=shift, keep_best=False), progress=False)
        return model

    a, b, plain = trained(2), trained(2), trained(0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, plain[0].weight)


def test_token_ids_are_refused_with_the_fix():
    g = torch.Generator().manual_seed(0)
    data = splits(torch.randint(0, 50, (32, 6), generator=g), torch.randint(0, 3, (32,), generator=g))
    model = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(24, 3))
    with pytest.raises(ConfigError, match=r"random_shift: 2 moves images \(N, C, H, W float\); the training inputs are "
                                          r"\(16, 6\): set random_shift: 0 for this model"):
        fit(model, data, TrainConfig(epochs=1, batch_size=16, random_shift=2), progress=False)


def test_a_negative_shift_is_refused():
    with pytest.raises(ConfigError, match="random_shift: -1 must be >= 0 pixels"):
        TrainConfig(random_shift=-1)
