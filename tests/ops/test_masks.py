"""Mask selection: exact counts per scope, whole blocks, N of every M, and clear pattern errors."""
from __future__ import annotations

import pytest
import torch

from deepshrink.core.errors import ConfigError
from deepshrink.ops.masks import (
    ELEMENT,
    NM,
    Block,
    check_fits,
    from_input_last,
    global_mask,
    input_last,
    local_mask,
    nm_mask,
    parse_pattern,
)


def _scores(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- element-wise scopes


def test_global_mask_prunes_exactly_round_s_total_below_one_threshold():
    scores = {"a": _scores(7, 5, seed=1), "b": _scores(3, 4, 2, 2, seed=2)}
    masks = global_mask(scores, 0.63)
    total = 35 + 48
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.63 * total) == 52
    pruned = torch.cat([scores[n][~masks[n]] for n in scores])
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    assert pruned.max() < kept.min()


def test_local_mask_prunes_each_tensor_exactly_with_per_name_sparsity():
    scores = {"a": _scores(10, 10, seed=3), "b": _scores(6, 5, seed=4)}
    masks = local_mask(scores, {"a": 0.25, "b": 0.9})
    assert int((~masks["a"]).sum()) == 25
    assert int((~masks["b"]).sum()) == 27
    assert scores["b"][~masks["b"]].max() < scores["b"][masks["b"]].min()


@pytest.mark.parametrize("sparsity, total, pruned", [
    (0.29, 100, 29),   # 0.29 * 100 = 28.999999999999996: truncating would prune 28
    (0.57, 100, 57),   # 56.99999999999999
    (0.5, 7, 4),       # 3.5: the nearest, not the floor
    (0.7, 5, 4),
])
def test_pruned_count_is_the_nearest_integer(sparsity, total, pruned):
    scores = _scores(total, seed=5)
    assert int((~global_mask({"w": scores}, sparsity)["w"]).sum()) == pruned
    assert int((~local_mask({"w": scores}, sparsity)["w"]).sum()) == pruned


def test_ties_are_pruned_in_index_order():
    masks = local_mask({"w": torch.zeros(2, 3)}, 0.5)
    assert masks["w"].tolist() == [[False, False, False], [True, True, True]]


def test_sparsity_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^sparsity: 1\.0 is outside \[0, 1\)"):
        global_mask({"w": torch.ones(4)}, 1.0)


# ---------------------------------------------------------------- layout and blocks


def test_input_last_puts_input_channels_innermost_and_round_trips():
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    rows = input_last(w)
    assert rows.shape == (2, 12)
    assert rows[0, :3].tolist() == [w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0]]  # one tap, every input channel
    assert torch.equal(from_input_last(rows, w.shape), w)


def test_block_masks_are_whole_blocks_chosen_by_summed_score():
    # row 0: block [5, 0, 0, 0] (sum 5) beats block [1, 1, 1, 1] (sum 4), though element-wise 0 < 1
    scores = torch.tensor([[5.0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 0.5, 0.5, 0.5, 0.5]])
    mask = local_mask({"w": scores}, 0.5, block=Block(1, 4))["w"]
    assert mask.tolist() == [[True] * 4 + [False] * 4, [True] * 4 + [False] * 4]
    # a block's score is its sum, not its largest entry: [0.9, 0, 0, 0] (0.9) goes before [0.5] * 4 (2.0)
    spiky = torch.tensor([[0.9, 0, 0, 0, 0.5, 0.5, 0.5, 0.5]])
    assert local_mask({"w": spiky}, 0.5, block=Block(1, 4))["w"].tolist() == [[False] * 4 + [True] * 4]


def test_conv_block_masks_are_whole_blocks_with_exact_block_count():
    scores = {"conv": _scores(8, 8, 3, 3, seed=5), "fc": _scores(4, 16, seed=6)}
    masks = global_mask(scores, 0.7, block=Block(4, 4))
    blocks = []
    for n, m in masks.items():
        rows = input_last(m)
        tiles = rows.reshape(rows.shape[0] // 4, 4, rows.shape[1] // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)
        assert bool(((tiles.sum(1) == 0) | (tiles.sum(1) == 16)).all()), n
        blocks.append(tiles.sum(1) == 0)
    pruned = torch.cat(blocks)
    assert pruned.numel() == 2 * 18 + 1 * 4  # conv: 8/4 rows x (9 taps * 8 in)/4; fc: 4/4 x 16/4
    assert int(pruned.sum()) == round(0.7 * 40) == 28


def test_element_block_is_plain_element_selection():
    scores = {"w": _scores(5, 7, seed=7)}
    assert torch.equal(local_mask(scores, 0.4, block=ELEMENT)["w"], local_mask(scores, 0.4)["w"])


# ---------------------------------------------------------------- N:M


@pytest.mark.parametrize("shape", [(8, 16), (6, 8, 3, 3)])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_exactly_the_n_highest_of_every_m_input_channels(shape, n, m):
    scores = _scores(*shape, seed=8)
    mask = nm_mask(scores, n, m)
    groups, kept = input_last(scores).reshape(-1, m), input_last(mask).reshape(-1, m)
    assert bool((kept.sum(1) == n).all())
    top = torch.zeros_like(kept).scatter_(1, groups.topk(n, dim=1).indices, True)
    assert torch.equal(kept, top)
    assert int((~mask).sum()) == mask.numel() * (m - n) // m


def test_nm_mask_prunes_already_dead_weights_first():
    scores = torch.tensor([[float("-inf"), 9.0, 8.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, True, False]]


# ---------------------------------------------------------------- pattern parsing and fit


@pytest.mark.parametrize("text, parsed", [("element", ELEMENT), ("2:4", NM(2, 4)), ("1x4", Block(1, 4)), ("4X4", Block(4, 4))])
def test_parse_pattern(text, parsed):
    assert parse_pattern(text) == parsed


@pytest.mark.parametrize("text, message", [
    ("5:4", r"^pattern: 5:4 has N > M; N:M keeps the N highest of every M weights, so N <= M, e.g. '2:4'$"),
    ("0:4", r"^pattern: 0:4 keeps no weight"),
    ("0x4", r"^pattern: block 0x4 is empty"),
    ("2-4", r"^pattern: '2-4' is not a pattern; use 'element', 'N:M' such as '2:4', or a block 'RxC' such as '1x4'$"),
    (124, r"^pattern: got the number 124: YAML reads an unquoted 2:4 as a base-60 number; quote it: pattern: '2:4'$"),
    (7, r"^pattern: got the number 7; use 'element'"),
])
def test_bad_patterns_say_what_to_write(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_pattern(text)


def test_pattern_that_does_not_tile_a_weight_names_the_layer_and_shape():
    with pytest.raises(ConfigError, match=r"^pattern: 2:4 does not fit 'conv1' with weight shape \(8, 6, 3, 3\): 6 input channels are not a multiple of 4"):
        check_fits("conv1", (8, 6, 3, 3), NM(2, 4))
    with pytest.raises(ConfigError, match=r"^pattern: block 4x4 does not fit 'fc' with weight shape \(10, 8\): blocks need output channels divisible by 4"):
        check_fits("fc", (10, 8), Block(4, 4))
    check_fits("fc", (10, 8), Block(2, 8))  # fits: no error
