"""Resemblyzer speaker encoder (Resemblyzer 0.1.4, GE2E, pretrained), with synthetic mel frames.

Import recipe: ``import resemblyzer`` runs ``resemblyzer/audio.py``, which imports webrtcvad,
librosa and ``scipy.ndimage.morphology`` (voice-activity trimming, resampling, mel features).
The network needs none of them. This file executes ``resemblyzer/voice_encoder.py`` on its own,
with the real ``resemblyzer/hparams.py`` and a stub ``resemblyzer`` / ``resemblyzer.audio`` put in
``sys.modules`` only while that file runs; ``VoiceEncoder(device="cpu")`` then loads the shipped
``resemblyzer/pretrained.pt`` (``checkpoint["model_state"]``) itself. Only ``forward`` is
usable: ``embed_utterance`` / ``embed_speaker`` need the stubbed ``audio`` module.

Model: ``forward(mels: float32 [batch, frames, 40]) -> float32 [batch, 256]``, one tensor: the
ReLU'd, L2-normalised projection of the last LSTM layer's final hidden state. 1,423,616
parameters: ``nn.LSTM(40, 256, num_layers=3, batch_first=True)`` 1,357,824 and
``nn.Linear(256, 256)`` 65,792 (the checkpoint's ``similarity_weight/bias`` are training-only
and not loaded, ``strict=False`` as in the package).

Samples: each one float32 ``[frames, 40]`` (no batch dim), frames 60..160 (160 = the package's
``partials_n_frames``). Stand-in for ``resemblyzer.wav_to_mel_spectrogram`` (which needs librosa):
synthetic voiced speech at 16 kHz (gliding f0 with jitter, three moving formants, breath noise,
pauses), volume-normalised to -30 dBFS like ``preprocess_wav``, then librosa's default
``melspectrogram`` re-implemented in torch: n_fft 400, hop 160, centred zero-padded periodic Hann
STFT, power 2, 40 Slaney mel bands 0-8 kHz. A power (not log) mel, as the package feeds it.
Batching samples of different lengths needs padding or one call per sample.

Export: ``torch.export`` of the model as it is specialises the frames dim (the LSTM's decomposition
guards ``Eq(frames, example)``), so the ``.onnx`` has fixed frames; the ``.pte`` path writes the LSTM
as a scan over time (``deploy.recurrent``), which exports with a dynamic frames dim (static batch).
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 40
_MODULE_NAME = "_deepshrink_examples_resemblyzer_voice_encoder"


def _voice_encoder_class() -> type:
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME].VoiceEncoder
    spec = importlib.util.find_spec("resemblyzer")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("Resemblyzer is not installed (pip install --no-deps Resemblyzer==0.1.4)")
    pkg_dir = Path(spec.origin).parent
    hp_spec = importlib.util.spec_from_file_location("resemblyzer.hparams", pkg_dir / "hparams.py")
    hparams = importlib.util.module_from_spec(hp_spec)
    hp_spec.loader.exec_module(hparams)  # plain constants, no imports
    pkg, audio = types.ModuleType("resemblyzer"), types.ModuleType("resemblyzer.audio")
    pkg.hparams, pkg.audio = hparams, audio
    stubs = {"resemblyzer": pkg, "resemblyzer.hparams": hparams, "resemblyzer.audio": audio}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        ve_spec = importlib.util.spec_from_file_location(_MODULE_NAME, pkg_dir / "voice_encoder.py")
        module = importlib.util.module_from_spec(ve_spec)
        ve_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    sys.modules[_MODULE_NAME] = module  # so the class can be found by name (pickle, deepcopy)
    return module.VoiceEncoder


def speaker_encoder() -> nn.Module:
    """Pretrained Resemblyzer ``VoiceEncoder`` on CPU, eval mode."""
    return _voice_encoder_class()(device="cpu", verbose=False).eval()


def _slaney_mel_filters() -> torch.Tensor:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40) (htk=False, norm='slaney'): [40, 201]."""
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    fdiff, ramps = np.diff(mel_f), mel_f[:, None] - fft_freqs[None, :]
    lower, upper = -ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return torch.from_numpy(weights).float()


def mel_frames(wav: torch.Tensor) -> torch.Tensor:
    """Power mel spectrogram ``[1 + len // 160, 40]`` of a 16 kHz float waveform (librosa defaults)."""
    spec = torch.stft(wav.float(), N_FFT, HOP, window=torch.hann_window(N_FFT), center=True,
                      pad_mode="constant", return_complex=True).abs() ** 2
    return (_slaney_mel_filters() @ spec).T.contiguous()


def _utterance(frames: int, g: torch.Generator) -> torch.Tensor:
    n = (frames - 1) * HOP
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    f0_base = 90 + 160 * float(r(1))  # speaker's mean pitch, 90-250 Hz
    f0 = f0_base * (1 + 0.15 * torch.sin(2 * math.pi * (0.5 + 2 * r(1)) * t + 6.3 * r(1)))
    f0 = f0 * (1 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64))
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SAMPLE_RATE
    formants = [(c * (1 + 0.15 * torch.sin(2 * math.pi * (1 + 3 * r(1)) * t + 6.3 * r(1))), a)  # moving F1-F3
                for c, a in ((500 + 400 * r(1), 1.0), (1200 + 900 * r(1), 0.5), (2500 + 700 * r(1), 0.25))]
    x = torch.zeros(n, dtype=torch.float64)
    for k in range(1, 40):
        fk = k * f0
        gain = sum(a / (1 + ((fk - fc) / 120) ** 2) for fc, a in formants)
        x += gain * torch.where(fk < SAMPLE_RATE / 2, torch.sin(k * phase), 0) / k
    x += 0.02 * torch.randn(n, generator=g, dtype=torch.float64)  # breath noise
    envelope = (torch.sin(2 * math.pi * (1.5 + 2 * float(r(1))) * t + 6.3 * float(r(1))) > -0.6).double()
    x = x * torch.nn.functional.avg_pool1d(envelope[None, None], 161, 1, 80, count_include_pad=False)[0, 0]
    x += 0.002 * torch.randn(n, generator=g, dtype=torch.float64)  # room noise in the pauses
    rms = float(torch.sqrt((x ** 2).mean()))
    return (x * (10 ** (-30 / 20) / max(rms, 1e-10))).float()  # -30 dBFS, as preprocess_wav


def _samples(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(60, 161, (count,), generator=g).tolist()
    return [mel_frames(_utterance(f, g)) for f in lengths]


def calibration_samples(n: int = 32) -> list[torch.Tensor]:
    """``n`` float32 mel tensors ``[frames, 40]``, frames in 60..160, seed 0."""
    return _samples(n, seed=0)


def evaluation_samples(n: int = 32) -> list[torch.Tensor]:
    """``n`` float32 mel tensors ``[frames, 40]``, frames in 60..160, seed 1 (disjoint voices)."""
    return _samples(n, seed=1)


PARTIAL_FRAMES = 160   # Resemblyzer embeds 160-frame partial utterances (``partials_n_frames``)


def _partials(samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each utterance as one ``[160, 40]`` window, cyclically repeated when shorter: a fixed frame
    count, because the LSTM's decomposition guards the frame count under torch.export."""
    out = []
    for mel in samples:
        reps = -(-PARTIAL_FRAMES // mel.shape[0])
        out.append(mel.repeat(reps, 1)[:PARTIAL_FRAMES].contiguous())
    return out


def calibration_partials(n: int = 32) -> list[torch.Tensor]:
    """``calibration_samples`` as fixed ``[160, 40]`` windows."""
    return _partials(calibration_samples(n))


def evaluation_partials(n: int = 32) -> list[torch.Tensor]:
    """``evaluation_samples`` as fixed ``[160, 40]`` windows."""
    return _partials(evaluation_samples(n))
