"""MTCNN face detector stages PNet, RNet, ONet (facenet-pytorch 2.6.0, pretrained), with crops.

Import recipe: ``import facenet_pytorch`` (and ``facenet_pytorch.models.mtcnn``) imports
``models/utils/detect_face.py``, which imports torchvision (``batched_nms``, transforms): it is
not installed and no torchvision build matches this torch. The three networks need only torch.
This file executes ``facenet_pytorch/models/mtcnn.py`` on its own, with a stub for its one
relative import (``.utils.detect_face``: ``detect_face``, ``extract_face``) in ``sys.modules``
only while that file runs; ``PNet()`` / ``RNet()`` / ``ONet()`` then load the state dicts shipped
in the wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``) themselves. The ``MTCNN`` wrapper
class (detection pipeline, NMS) is not usable this way.

Models (all ``forward(x: float32 [batch, 3, H, W])``, a tuple of tensors, softmax probs last):
  PNet  fully convolutional, any H, W >= 12; returns ``(reg [b, 4, h, w], prob [b, 2, h, w])``
        with h = ceil((H - 2) / 2) - 4 (same for w). 6,632 parameters.
  RNet  H = W = 24; returns ``(reg [b, 4], prob [b, 2])``. 100,178 parameters.
  ONet  H = W = 48; returns ``(reg [b, 4], landmarks [b, 10], prob [b, 2])``. 389,040 parameters.
Parameters sit in ``nn.Conv2d`` (3x3, 2x2, 1x1 kernels), ``nn.Linear`` (RNet, ONet) and
``nn.PReLU`` (one slope per channel after every conv / hidden linear); ``MaxPool2d(ceil_mode=True)``.

Samples: each one float32 ``[3, H, W]`` (no batch dim), RGB pixel values 0..255 normalised as
``detect_face`` does, ``(x - 127.5) * 0.0078125``. Synthetic: a textured background with, in
about half the crops, a cartoon face (skin-tone ellipse, eyes, brows, nose, mouth) at a random
offset and scale, drawn at 96 px and area-resized to the net's size like ``imresample``.
PNet crops have H and W drawn independently from 12..48; RNet 24x24; ONet 48x48. Calibration
(seed 0) and evaluation (seed 1) are drawn from different seeds.

Export: PNet's H, W need ``Dim.AUTO(min=12, max=1024)`` (a named ``Dim`` fails on the
ceil-mode pooling guard). RNet / ONet apply a PReLU to ``[batch, features]``, which ExecuTorch
1.5.1's XNNPACK lowering rejects; ``deploy.xnnpack_fixes.prelu_to_4d`` views it as 4-D (exact).
Their ceil-mode max pools run inside XNNPACK only with static shapes (``static_batch: true``).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_PKG = "_deepshrink_examples_facenet"


def _mtcnn_module() -> types.ModuleType:
    if f"{_PKG}.mtcnn" in sys.modules:
        return sys.modules[f"{_PKG}.mtcnn"]
    spec = importlib.util.find_spec("facenet_pytorch")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0)")
    source = Path(spec.origin).parent / "models" / "mtcnn.py"
    pkg, utils, detect = (types.ModuleType(n) for n in (_PKG, f"{_PKG}.utils", f"{_PKG}.utils.detect_face"))
    pkg.__path__, utils.__path__ = [], []

    def _unavailable(*args, **kwargs):
        raise RuntimeError("facenet_pytorch detect_face needs torchvision; only PNet/RNet/ONet are loaded")

    detect.detect_face = detect.extract_face = _unavailable
    stubs = {_PKG: pkg, f"{_PKG}.utils": utils, f"{_PKG}.utils.detect_face": detect}
    sys.modules.update(stubs)
    try:
        mspec = importlib.util.spec_from_file_location(f"{_PKG}.mtcnn", source)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    finally:
        for k in stubs:
            sys.modules.pop(k, None)
    sys.modules[f"{_PKG}.mtcnn"] = module  # so the classes can be found by name (pickle, deepcopy)
    return module


def pnet() -> nn.Module:
    """Pretrained MTCNN PNet, eval mode."""
    return _mtcnn_module().PNet(pretrained=True).eval()


def rnet() -> nn.Module:
    """Pretrained MTCNN RNet, eval mode."""
    return _mtcnn_module().RNet(pretrained=True).eval()


def onet() -> nn.Module:
    """Pretrained MTCNN ONet, eval mode."""
    return _mtcnn_module().ONet(pretrained=True).eval()


def _canvas(g: torch.Generator, size: int = 96) -> torch.Tensor:
    """One RGB image [3, size, size], values 0..255."""
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base, tilt = 40 + 180 * r(3, 1, 1), 60 * (r(3, 1, 1) - 0.5)
    img = base + tilt * (xx * r(1) + yy * r(1)) + 25 * torch.randn(3, size, size, generator=g)
    img = img + 30 * torch.sin(8 * r(1) * xx + 8 * r(1) * yy + 6 * r(1))  # stripes / texture
    if r(1) < 0.5:
        cx, cy, s = 0.3 * (r(1) - 0.5), 0.3 * (r(1) - 0.5), 0.6 + 0.35 * r(1)
        x, y = (xx - cx) / s, (yy - cy) / s
        skin = torch.tensor([200.0, 150.0, 120.0])[:, None, None] * (0.55 + 0.5 * r(1))
        img = torch.where((x / 0.75) ** 2 + (y / 0.95) ** 2 < 1, skin + 8 * torch.randn(3, size, size, generator=g), img)

        def paint(mask, value):
            return torch.where(mask, torch.full_like(img, value), img)

        for ex in (-0.32, 0.32):
            img = paint(((x - ex) / 0.14) ** 2 + ((y + 0.2) / 0.07) ** 2 < 1, 30.0)  # eyes
            img = paint(((x - ex) / 0.18) ** 2 + ((y + 0.38) / 0.03) ** 2 < 1, 50.0)  # brows
        img = paint((x.abs() < 0.05) & (y > -0.1) & (y < 0.2), float(skin.mean() * 0.8))  # nose
        img = paint((x / 0.3) ** 2 + ((y - 0.45) / 0.06) ** 2 < 1, 90.0)  # mouth
    return img.clamp(0, 255).round()


def _crops(count: int, seed: int, size: int | None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        h, w = (size, size) if size else torch.randint(12, 49, (2,), generator=g).tolist()
        img = F.interpolate(_canvas(g)[None], size=(h, w), mode="area")[0]  # facenet imresample
        out.append((img - 127.5) * 0.0078125)
    return out


def pnet_calibration_samples(n: int = 64) -> list[torch.Tensor]:
    """``n`` float32 ``[3, H, W]``, H and W each in 12..48, seed 0."""
    return _crops(n, seed=0, size=None)


def pnet_evaluation_samples(n: int = 64) -> list[torch.Tensor]:
    """``n`` float32 ``[3, H, W]``, H and W each in 12..48, seed 1."""
    return _crops(n, seed=1, size=None)


def rnet_calibration_samples(n: int = 64) -> list[torch.Tensor]:
    """``n`` float32 ``[3, 24, 24]``, seed 0."""
    return _crops(n, seed=0, size=24)


def rnet_evaluation_samples(n: int = 64) -> list[torch.Tensor]:
    """``n`` float32 ``[3, 24, 24]``, seed 1."""
    return _crops(n, seed=1, size=24)


def onet_calibration_samples(n: int = 64) -> list[torch.Tensor]:
    """``n`` float32 ``[3, 48, 48]``, seed 0."""
    return _crops(n, seed=0, size=48)


def onet_evaluation_samples(n: int = 64) -> list[torch.Tensor]:
    """``n`` float32 ``[3, 48, 48]``, seed 1."""
    return _crops(n, seed=1, size=48)
