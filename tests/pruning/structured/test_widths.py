"""Width rounding and selection: pure functions, exact numbers."""
from __future__ import annotations

import pytest
import torch

from deepshrink.pruning.structured import global_counts, local_counts, round_channels, top_channels


@pytest.mark.parametrize("keep, original, multiple, expected", [
    (5.0, 20, 8, 8),      # nearest multiple of 5 is 8 (0.625 -> 1)
    (12.5, 50, 8, 16),    # 1.5625 -> 2
    (12.0, 50, 8, 16),    # exactly half way rounds up
    (11.9, 50, 8, 8),     # just below half way rounds down
    (0.0, 50, 8, 8),      # never zero channels: at least one multiple
    (19.0, 20, 8, 16),    # 2.375 -> 16
    (20.0, 20, 8, 20),    # nearest (24) would pass the original: keep the original width
    (21.0, 24, 8, 24),    # nearest is the original itself
    (100.0, 500, 8, 104), # 12.5 -> 13 multiples
    (3.0, 8, 8, 8),       # one multiple or less: not pruned
    (2.0, 4, 8, 4),
    (0.2, 10, 1, 1),      # multiple 1: nearest integer, at least 1
    (4.5, 10, 1, 5),
])
def test_round_channels_follows_the_documented_rule(keep, original, multiple, expected):
    assert round_channels(keep, original, multiple) == expected


def test_round_channels_never_exceeds_the_original_and_is_a_multiple_below_it():
    for original in range(1, 80):
        for keep10 in range(0, 10 * original + 1):
            k = round_channels(keep10 / 10, original, 8)
            assert 1 <= k <= original
            assert k == original or k % 8 == 0


def test_local_counts_use_the_reference_size_for_later_steps():
    assert local_counts([64, 20], [0.5, 0.5], 8) == [32, 8]
    # a second step towards 0.75 of the original 64, from a group already at 32
    assert local_counts([32, 8], [0.75, 0.75], 8, reference=[64, 20]) == [16, 8]


def test_global_counts_rank_mean_normalized_scores_across_groups():
    # group a: scores 1..16 (mean 8.5); group b: 16 equal scores (all normalize to 1.0)
    a = torch.arange(1, 17, dtype=torch.float64)
    b = torch.full((16,), 100.0)
    # remove 16 of 32: a's normalized scores below 1.0 are 1..8 (8 of them), then ties at 1.0 in b go in order
    counts = global_counts([a, b], 0.5, 1)
    assert counts == [8, 8]
    assert global_counts([a, b], 0.5, 8) == [8, 8]
    assert global_counts([a, b], 0.0, 8) == [16, 16]


def test_top_channels_keeps_the_highest_and_breaks_ties_by_index():
    keep = top_channels(torch.tensor([0.3, 0.9, 0.3, 0.1, 0.5]), 3)
    assert keep.tolist() == [True, True, False, False, True]
    keep = top_channels(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2)
    assert keep.tolist() == [True, True, False, False]


def test_a_half_computed_a_hair_low_still_rounds_up():
    assert 35 * (1 - 0.9) < 3.5                                   # 3.4999999999999996
    assert round_channels(35 * (1 - 0.9), 35, 1) == 4
    assert local_counts([35], [0.9], 1) == [4]


def test_top_channels_ties_keep_the_lower_indices():
    scores = torch.zeros(5000)
    scores[::7] = 1.0                                             # 715 ones, then ties at zero
    keep = top_channels(scores, 1000)
    expected = scores == 1
    expected[torch.nonzero(scores == 0).flatten()[:285]] = True
    assert torch.equal(keep, expected)
