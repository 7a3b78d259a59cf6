"""vpmaddubsw's arithmetic: pairs of u8 x s8 products summed into a saturating int16."""
import torch

from deepshrink.ops.int_kernels import INT16_MAX, max_pair_sum, pair_peaks, pair_sums, u8s8_dot


def test_exact_dot_products_match_a_matmul():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (7, 33), generator=g)       # odd K: the last element pairs with zero
    w = torch.randint(-127, 128, (5, 33), generator=g)
    exact, _ = u8s8_dot(a, w, saturate_pairs=False)
    assert torch.equal(exact, a.long() @ w.long().T)


def test_full_range_pairs_saturate_and_7_bit_pairs_cannot():
    a = torch.full((1, 4), 255)
    w = torch.full((1, 4), 127)
    assert pair_sums(a, w).flatten().tolist() == [64770.0, 64770.0]
    saturated, clipped = u8s8_dot(a, w, saturate_pairs=True)
    assert clipped == 2 and saturated.item() == 2 * INT16_MAX          # 65,534 instead of 129,540
    assert max_pair_sum(255, 127) > INT16_MAX >= max_pair_sum(255, 63) == 32130
    # every extreme of a 7-bit weight range against every u8 extreme: nothing leaves int16
    extremes_a = torch.tensor([[0, 0], [255, 255], [255, 0], [0, 255]])
    extremes_w = torch.tensor([[-63, -63], [63, 63], [-63, 63], [63, -63]])
    assert u8s8_dot(extremes_a, extremes_w, saturate_pairs=True)[1] == 0


def test_saturation_count_does_not_depend_on_clamping():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(200, 256, (16, 64), generator=g)
    w = torch.randint(100, 128, (8, 64), generator=g)
    exact, clipped_exact = u8s8_dot(a, w, saturate_pairs=False)
    saturated, clipped = u8s8_dot(a, w, saturate_pairs=True)
    assert clipped == clipped_exact == 16 * 8 * 32
    assert bool((saturated < exact).all())


def test_pair_peaks_are_exact_above_the_threshold_and_bounded_below_it():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (40, 19), generator=g)                  # odd K: the last weight pairs with zero
    w = torch.randint(-127, 128, (6, 19), generator=g)
    w[5] = torch.randint(-3, 4, (19,), generator=g)                  # a row too small to come near int16
    exact = pair_sums(a, w).abs().amax((0, 1)).long()
    for above in (0, 10_000, INT16_MAX):
        peaks = pair_peaks(a, w, above=above, chunk=7)               # chunking must not change the result
        assert torch.equal(peaks[exact > above], exact[exact > above])
        assert bool((peaks[exact <= above] <= above).all()) and bool((peaks >= exact).all())
    assert torch.equal(pair_peaks(a, w, above=0), exact)              # above 0: every peak exact
