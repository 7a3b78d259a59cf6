"""Reference models. Every model takes ``[N, 1, 28, 28]`` images and returns ``[N, classes]`` logits."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deepshrink.core.errors import ModelLoadError


class MLP(nn.Module):
    """Fully connected net on flattened images: ``lenet-300-100`` and ``seed-mlp``."""

    def __init__(self, hidden: tuple[int, ...] = (300, 100), in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        widths = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.classifier(x)


class LeNet5(nn.Module):
    """Caffe's LeNet (the variant Deep Compression reports): conv 20 5x5, pool, conv 50 5x5, pool,
    fc 500, ReLU, fc 10 — 431,080 parameters. As in Caffe, the convolutions have no activation."""

    def __init__(self, conv1: int = 20, conv2: int = 50, fc1: int = 500, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, 5)
        self.conv2 = nn.Conv2d(conv1, conv2, 5)
        self.fc1 = nn.Linear(conv2 * 4 * 4, fc1)
        self.fc2 = nn.Linear(fc1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv1(x), 2)
        x = torch.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": lambda **kw: MLP(hidden=tuple(kw.pop("hidden", (300, 100))), **kw),
    "seed-mlp": lambda **kw: MLP(hidden=tuple(kw.pop("hidden", (256,))), **kw),
    "lenet-5": lambda **kw: LeNet5(**kw),
    "mobile-cnn": lambda **kw: _mobile_cnn(**kw),
}


def _mobile_cnn(**kw) -> nn.Module:
    from deepshrink.models.mobile import mobile_cnn

    return mobile_cnn(**kw)


def create(name: str, **kwargs: object) -> nn.Module:
    """A freshly initialised zoo model; it remembers its name and arguments for checkpoints."""
    if name not in ZOO:
        raise ModelLoadError(f"model: unknown model {name!r}; choose one of {', '.join(ZOO)}, or give path/to/file.py:ClassName or a checkpoint")
    try:
        model = ZOO[name](**dict(kwargs))
    except (TypeError, ValueError, RuntimeError) as err:   # a wrong type, a negative or absurd size
        raise ModelLoadError(f"model: bad arguments for {name!r}: {err}") from None
    set_arch(model, {"zoo": name, "kwargs": dict(kwargs)})
    return model


def set_arch(model: nn.Module, arch: dict) -> None:
    """How to rebuild this module's skeleton: ``{"zoo": ..}`` or ``{"file": .., "class": ..}``."""
    object.__setattr__(model, "_deepshrink_arch", arch)


def get_arch(model: nn.Module) -> dict | None:
    return getattr(model, "_deepshrink_arch", None)
