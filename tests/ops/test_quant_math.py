"""Numbers for the uniform affine primitives: hand-computed qparams, round trips, STE, LSQ, SQNR."""
from __future__ import annotations

import math

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.ops.quant_math import (
    DEFAULT_EPS,
    choose_qparams,
    dequantize_affine,
    fake_quantize,
    integer_dtype,
    lsq_fake_quantize,
    lsq_grad_scale,
    qrange,
    quantize_affine,
    sqnr_db,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _round_trip(x, bits, symmetric, granularity, **kw):
    scale, zp = choose_qparams(x, bits=bits, symmetric=symmetric, granularity=granularity, **kw)
    qmin, qmax = qrange(bits, symmetric)
    where = {"axis": kw.get("axis", 0)} if granularity == "per_channel" else {}
    if granularity == "per_group":
        where = {"group_size": kw["group_size"]}
    q = quantize_affine(x, scale, zp, qmin=qmin, qmax=qmax, **where)
    return q, dequantize_affine(q, scale, zp, **where), scale, zp, where


# ---------------------------------------------------------------- qrange and dtypes


@pytest.mark.parametrize(
    "bits,symmetric,expected",
    [(8, True, (-128, 127)), (8, False, (0, 255)), (4, True, (-8, 7)), (4, False, (0, 15)), (2, True, (-2, 1))],
)
def test_qrange(bits, symmetric, expected):
    assert qrange(bits, symmetric) == expected


def test_integer_dtype_is_the_smallest_that_fits():
    assert integer_dtype(-128, 127) is torch.int8
    assert integer_dtype(0, 255) is torch.uint8
    assert integer_dtype(0, 15) is torch.uint8
    assert integer_dtype(-1000, 1000) is torch.int16
    x = torch.tensor([-3.0, 3.0])
    q = quantize_affine(x, torch.tensor(0.001), torch.tensor(0), qmin=-1000, qmax=1000)
    assert q.dtype is torch.int16 and q.tolist() == [-1000, 1000]


# ---------------------------------------------------------------- hand-computed qparams


def test_symmetric_per_tensor_hand_computed():
    x = torch.tensor([-7.0, 0.5, 3.0, 1.5])
    scale, zp = choose_qparams(x, bits=4, symmetric=True, granularity="per_tensor")
    assert scale.shape == () and scale.item() == 1.0 and zp.item() == 0
    q = quantize_affine(x, scale, zp, qmin=-8, qmax=7)
    assert q.dtype is torch.int8
    assert q.tolist() == [-7, 0, 3, 2]  # 0.5 and 1.5 round half to even


def test_asymmetric_per_tensor_hand_computed():
    x = torch.tensor([-3.0, 0.0, 5.0, 12.0])
    scale, zp = choose_qparams(x, bits=4, symmetric=False, granularity="per_tensor")
    assert scale.item() == 1.0 and zp.item() == 3 and zp.dtype is torch.int32
    q = quantize_affine(x, scale, zp, qmin=0, qmax=15)
    assert q.dtype is torch.uint8 and q.tolist() == [0, 3, 8, 15]

    scale8, zp8 = choose_qparams(torch.tensor([-1.0, 2.0]), bits=8, symmetric=False, granularity="per_tensor")
    assert scale8.item() == pytest.approx(3.0 / 255) and zp8.item() == 85


def test_asymmetric_range_always_includes_zero():
    x = torch.tensor([1.0, 2.0, 5.1])
    scale, zp = choose_qparams(x, bits=8, symmetric=False, granularity="per_tensor")
    assert scale.item() == pytest.approx(5.1 / 255) and zp.item() == 0
    scale, zp = choose_qparams(-x, bits=8, symmetric=False, granularity="per_tensor")
    assert zp.item() == 255
    q = quantize_affine(torch.tensor([0.0]), scale, zp, qmin=0, qmax=255)
    assert dequantize_affine(q, scale, zp).item() == 0.0


def test_per_channel_scales_are_per_output_channel():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]])
    scale, zp = choose_qparams(w, bits=8, symmetric=True, granularity="per_channel", axis=0)
    expected = torch.tensor([2.0 / 127, 0.5 / 127, DEFAULT_EPS])
    assert scale.shape == (3,) and torch.allclose(scale, expected, rtol=1e-6, atol=0)
    assert zp.tolist() == [0, 0, 0]
    q = quantize_affine(w, scale, zp, qmin=-128, qmax=127, axis=0)
    assert q.tolist() == [[64, -127], [127, 64], [0, 0]]  # 63.5 -> 64 (half to even)


def test_per_channel_conv_weight_and_other_axis():
    w = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2) - 4.0  # conv [out, in, kh, kw]
    scale, zp = choose_qparams(w, bits=8, symmetric=False, granularity="per_channel", axis=0)
    # out channel 0 holds -4..3, channel 1 holds 4..11 (range extended down to 0)
    assert torch.allclose(scale, torch.tensor([7.0 / 255, 11.0 / 255]))
    assert zp.tolist() == [round(4.0 / (7.0 / 255)), 0]
    scale_in, _ = choose_qparams(w, bits=8, symmetric=True, granularity="per_channel", axis=-3)
    # input channel 0 holds {-4..-1, 4..7}, input channel 1 holds {0..3, 8..11}
    assert torch.allclose(scale_in, torch.tensor([7.0 / 127, 11.0 / 127]))


def test_per_group_scales_follow_groups_of_each_row():
    x = torch.tensor([[1.0, -4.0, 3.0, 0.0, 8.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.5, -1.0, 0.0, 0.0]])
    scale, zp = choose_qparams(x, bits=4, symmetric=True, granularity="per_group", group_size=4)
    assert scale.shape == (2, 2)
    assert torch.allclose(scale, torch.tensor([[4.0 / 7, 8.0 / 7], [DEFAULT_EPS, 1.0 / 7]]))
    q = quantize_affine(x, scale, zp, qmin=-8, qmax=7, group_size=4)
    assert q.shape == x.shape and q[0, :4].tolist() == [2, -7, 5, 0]  # 1.75, -7, 5.25, 0


def test_all_zero_tensor_gives_eps_scale_and_exact_zeros():
    for symmetric in (True, False):
        x = torch.zeros(3, 4)
        for gran, kw in (("per_tensor", {}), ("per_channel", {"axis": 0}), ("per_group", {"group_size": 2})):
            q, x_hat, scale, zp, _ = _round_trip(x, 8, symmetric, gran, **kw)
            assert torch.all(scale == DEFAULT_EPS) and torch.all(zp == 0)
            assert torch.equal(x_hat, x) and not torch.isnan(x_hat).any()


# ---------------------------------------------------------------- round trips and references


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "granularity,kw", [("per_tensor", {}), ("per_channel", {"axis": 0}), ("per_channel", {"axis": 1}),
                       ("per_group", {"group_size": 16})]
)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_within_half_a_step(symmetric, granularity, kw, bits):
    x = torch.randn(6, 32, generator=_gen(1))
    q, x_hat, scale, zp, where = _round_trip(x, bits, symmetric, granularity, **kw)
    if granularity == "per_group":
        step = scale.repeat_interleave(16, dim=1)
    elif granularity == "per_channel":
        step = scale.reshape([-1, 1] if kw["axis"] == 0 else [1, -1]).expand_as(x)
    else:
        step = scale.expand_as(x)
    assert torch.all((x - x_hat).abs() <= step / 2 * (1 + 1e-5))
    # quantizing the dequantized tensor again is exact: codes are a fixed point
    again = quantize_affine(x_hat, scale, zp, qmin=qrange(bits, symmetric)[0], qmax=qrange(bits, symmetric)[1], **where)
    assert torch.equal(again, q)


def test_fake_quantize_matches_torch_reference():
    x = torch.randn(4, 50, generator=_gen(2)) * 3
    scale, zp = choose_qparams(x, bits=8, symmetric=False, granularity="per_channel")
    ours = fake_quantize(x, scale, zp, qmin=0, qmax=255, axis=0)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, 0, 255)
    assert torch.allclose(ours, ref, atol=1e-6)
    s, z = choose_qparams(x, bits=8, symmetric=True, granularity="per_tensor")
    ours_t = fake_quantize(x, s, z, qmin=-128, qmax=127)
    ref_t = torch.fake_quantize_per_tensor_affine(x, s.item(), 0, -128, 127)
    assert torch.allclose(ours_t, ref_t, atol=1e-6)


def test_sqnr_8bit_per_channel_beats_4bit():
    w = torch.randn(16, 64, generator=_gen(3)) * torch.logspace(-2, 0, 16).unsqueeze(1)
    db = {}
    for bits in (8, 4):
        _, w_hat, *_ = _round_trip(w, bits, True, "per_channel")
        db[bits] = sqnr_db(w, w_hat)
    _, w_tensor, *_ = _round_trip(w, 8, True, "per_tensor")
    assert db[8] > 38.0 and db[4] > 14.0 and db[8] - db[4] > 20.0  # ~6 dB per bit
    assert db[8] > sqnr_db(w, w_tensor) + 3.0  # channels of very different ranges


def test_sqnr_hand_computed():
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    assert sqnr_db(torch.ones(3), torch.ones(3)) == math.inf


# ---------------------------------------------------------------- gradients


def test_ste_gradient_is_one_inside_and_zero_outside():
    x = torch.tensor([-10.0, -0.3, 0.2, 0.7, 0.76, 10.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), qmin=-8, qmax=7)
    assert torch.allclose(y, torch.tensor([-0.8, -0.3, 0.2, 0.7, 0.7, 0.7]))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_ste_gradient_per_group_and_reference_mask():
    x = torch.randn(3, 8, generator=_gen(4)).requires_grad_()
    scale = torch.full((3, 2), 0.2)
    zp = torch.zeros(3, 2, dtype=torch.int32)
    fake_quantize(x, scale, zp, qmin=-4, qmax=3, group_size=4).sum().backward()
    codes = torch.round(x.detach() / 0.2)
    assert torch.equal(x.grad, ((codes >= -4) & (codes <= 3)).float())


def test_lsq_scale_gradient_matches_paper_formula():
    x = torch.tensor([-1.0, -0.13, 0.04, 0.26, 0.5]).requires_grad_()
    scale = torch.tensor(0.1, requires_grad=True)
    g = lsq_grad_scale(x.numel(), 3)
    y = lsq_fake_quantize(x, scale, qmin=-4, qmax=3, grad_scale=g)
    assert torch.allclose(y, torch.tensor([-0.4, -0.1, 0.0, 0.3, 0.3]))
    y.sum().backward()
    v = torch.tensor([-10.0, -1.3, 0.4, 2.6, 5.0])
    per_elem = torch.tensor([-4.0, 0.0, 0.0, 0.0, 3.0]) + torch.tensor([0, 1, 1, 1, 0]) * (torch.round(v) - v)
    assert scale.grad.item() == pytest.approx(g * per_elem.sum().item(), rel=1e-5)
    assert scale.grad.item() != 0.0
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert g == pytest.approx(1 / math.sqrt(15))


def test_lsq_per_channel_scales_each_get_a_gradient():
    w = torch.randn(4, 10, generator=_gen(5))
    scale = torch.full((4,), 0.05, requires_grad=True)
    y = lsq_fake_quantize(w, scale, qmin=-8, qmax=7, grad_scale=lsq_grad_scale(10, 7), axis=0)
    ((y - w) ** 2).sum().backward()
    assert scale.grad.shape == (4,) and torch.all(scale.grad != 0)
    # the error gradient says "grow the step": most values are clipped at 0.05 * 8
    assert torch.all(scale.grad < 0)


# ---------------------------------------------------------------- errors


def test_bits_outside_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^bits: 9 is outside 2\.\.8; "):
        choose_qparams(torch.ones(3), bits=9, symmetric=True, granularity="per_tensor")
    with pytest.raises(ConfigError, match=r"^bits: 1 is outside 2\.\.8"):
        qrange(1, False)


def test_group_size_not_dividing_names_size_and_dimension():
    with pytest.raises(ConfigError, match=r"group_size: 3 does not divide the row length 8") as err:
        choose_qparams(torch.ones(2, 8), bits=4, symmetric=True, granularity="per_group", group_size=3)
    assert "such as 2, 4, 8" in str(err.value)
    with pytest.raises(ConfigError, match=r"group_size: missing"):
        choose_qparams(torch.ones(2, 8), bits=4, symmetric=True, granularity="per_group")


def test_bad_granularity_axis_and_shapes_are_config_errors():
    x = torch.ones(2, 3)
    with pytest.raises(ConfigError, match=r"granularity: 'per_row' is not allowed; choose one of 'per_tensor'"):
        choose_qparams(x, bits=8, symmetric=True, granularity="per_row")
    with pytest.raises(ConfigError, match=r"axis: 2 is out of range for a 2-D tensor"):
        choose_qparams(x, bits=8, symmetric=True, granularity="per_channel", axis=2)
    with pytest.raises(ConfigError, match=r"scale: shape \[2\] has 2 entries but neither axis nor group_size"):
        quantize_affine(x, torch.ones(2), torch.zeros(2), qmin=-128, qmax=127)
    with pytest.raises(ConfigError, match=r"scale: shape \[2\] does not match x.shape\[1\] = 3"):
        quantize_affine(x, torch.ones(2), torch.zeros(2), qmin=-128, qmax=127, axis=1)
    with pytest.raises(ConfigError, match=r"sqnr_db: reference shape \[2, 3\] differs"):
        sqnr_db(x, torch.ones(3))
