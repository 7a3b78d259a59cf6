"""Range selection on constructed activations: exact quantiles, ACIQ's optimal clip, TensorRT's KL."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.quantization.observers import CalibrationObserver
from deepshrink.quantization.ranges import entropy_range, mse_range, percentile_range


def _observe(method: str, x: torch.Tensor, **kw) -> CalibrationObserver:
    obs = CalibrationObserver(method=method, dtype=torch.int8, quant_min=-128, quant_max=127, eps=2**-12, **kw)
    obs(x)
    return obs


def _outlier_activations() -> torch.Tensor:
    # 10,000 ReLU-like values evenly in [0, 1] and one outlier at 100
    return torch.cat([torch.linspace(0, 1, 10_000), torch.tensor([100.0])])


def test_percentile_of_a_flat_histogram_is_exact():
    counts = np.ones(100)  # one value per unit on [0, 100]
    assert percentile_range(counts, 0.0, 100.0, 99.0) == pytest.approx((1.0, 99.0), abs=1e-9)
    assert percentile_range(counts, -50.0, 50.0, 90.0) == pytest.approx((-40.0, 40.0), abs=1e-9)  # 10 % off each tail
    assert percentile_range(counts, 0.0, 100.0, 100.0) == pytest.approx((0.0, 100.0), abs=1e-9)


def test_minmax_keeps_the_outlier_and_percentile_clips_it():
    x = _outlier_activations()
    bin_width = 100.0 / 2048
    assert _observe("minmax", x).chosen_range() == pytest.approx((0.0, 100.0))
    lo, hi = _observe("percentile", x, percentile=99.9).chosen_range()
    assert lo == pytest.approx(0.0, abs=bin_width) and hi == pytest.approx(1.0, abs=bin_width)
    # the scale follows: 100/255 for minmax, about 1/255 for percentile
    scale_minmax, zp_minmax = _observe("minmax", x).calculate_qparams()
    scale_pct, zp_pct = _observe("percentile", x, percentile=99.9).calculate_qparams()
    assert float(scale_minmax) == pytest.approx(100.0 / 255, rel=1e-6) and int(zp_minmax) == -128
    assert float(scale_pct) == pytest.approx(hi / 255, rel=1e-6) and int(zp_pct) == -128


def test_mse_clip_of_a_laplace_matches_aciq():
    # Banner et al. 2019 (ACIQ), Table 1: the MSE-optimal clip of Laplace(0, b) on 4 bits is 5.03 b
    rng = np.random.default_rng(0)
    samples = rng.laplace(0.0, 1.0, 400_000)
    counts, edges = np.histogram(samples, bins=2048)
    lo, hi = mse_range(counts, edges[0], edges[-1], levels=16, grid=200)
    assert -lo == pytest.approx(5.03, rel=0.08) and hi == pytest.approx(5.03, rel=0.08)


def test_mse_range_is_as_good_as_a_brute_force_search():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_t(3, 20_000)).float()  # heavy tails

    def error(lo: float, hi: float) -> float:
        scale = (hi - lo) / 255
        zp = int(np.clip(-128 - round(lo / scale), -128, 127))
        return float((x - torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)).pow(2).mean())

    obs = _observe("mse", x)
    lo, hi = obs.observed_range()
    brute = min(error(lo * a, hi * b) for a in np.linspace(0.3, 1, 25) for b in np.linspace(0.3, 1, 25))
    chosen = error(*obs.chosen_range())
    assert chosen <= 1.01 * brute
    assert chosen < 0.96 * error(lo, hi)  # minmax


def _reference_kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Migacz's pseudo-code, written out with loops (the implementation under test is vectorised)."""
    best, best_i = math.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        reference = [float(v) for v in hist[:i]]
        reference[i - 1] += float(hist[i:].sum())
        chunk = i / levels
        expanded = [0.0] * i
        for j in range(levels):
            start, stop = int(math.floor(j * chunk)), int(math.floor((j + 1) * chunk))
            stop = i if j == levels - 1 else stop
            values = hist[start:stop]
            nonzero = sum(1 for v in values if v != 0)
            for k in range(start, stop):
                expanded[k] = float(values.sum()) / nonzero if hist[k] != 0 and nonzero else 0.0
        p = np.array(reference) / sum(reference)
        q = np.array(expanded) / sum(expanded)
        q = np.where((p > 0) & (q == 0), 1e-12, q)
        kl = float(sum(pv * math.log(pv / qv) for pv, qv in zip(p, q) if pv > 0))
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_entropy_threshold_matches_the_reference_algorithm():
    rng = np.random.default_rng(2)
    counts, edges = np.histogram(np.abs(rng.laplace(0.0, 1.0, 200_000)), bins=512)
    lo, hi = entropy_range(counts, 0.0, float(edges[-1]), levels=64, max_candidates=10_000)
    width = edges[-1] / 512
    assert lo == 0.0
    assert hi == pytest.approx(_reference_kl_threshold(counts, 64) * width, rel=1e-9)
    assert hi < 0.8 * edges[-1]  # the long tail is clipped


def test_entropy_of_a_two_signed_histogram_is_symmetric():
    rng = np.random.default_rng(3)
    counts, edges = np.histogram(rng.normal(0.0, 1.0, 200_000), bins=2048)
    lo, hi = entropy_range(counts, float(edges[0]), float(edges[-1]))
    assert lo == pytest.approx(-hi, rel=1e-6) or lo == pytest.approx(edges[0])
    assert 2.5 < hi < float(edges[-1])


def test_every_method_calibrates_an_observer():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    for method in ("minmax", "histogram", "percentile", "mse", "entropy"):
        lo, hi = _observe(method, x).chosen_range()
        assert float(x.min()) - 1e-6 <= lo < 0 < hi <= float(x.max()) + 1e-6, method


def test_bad_inputs_raise_config_errors():
    with pytest.raises(ConfigError, match="calibration: 'kl' is not allowed"):
        CalibrationObserver(method="kl")
    with pytest.raises(ConfigError, match=r"percentile: 40 is outside \(50, 100\]"):
        percentile_range(np.ones(4), 0.0, 1.0, 40)
    with pytest.raises(ConfigError, match="the histogram is empty"):
        mse_range(np.zeros(4), 0.0, 1.0)
