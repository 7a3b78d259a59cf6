import pytest

from deepshrink.core.errors import ConfigError
from deepshrink.core.selection import first_match, select

NAMES = ["conv1", "conv2", "fc1", "fc2"]


def test_exact_regex_and_star():
    assert select(NAMES, ["fc1"], what="x") == ["fc1"]
    assert select(NAMES, ["re:conv.*"], what="x") == ["conv1", "conv2"]
    assert select(NAMES, ["fc2", "*"], what="x") == NAMES  # model order, no duplicates


def test_regex_must_match_the_whole_name():
    names = ["conv1", "conv1.bn", "conv2", "fc1", "fc10", "head.fc1"]
    assert select(names, ["re:conv\\d"], what="x") == ["conv1", "conv2"]       # not conv1.bn (a prefix match)
    assert select(names, ["re:fc1"], what="x") == ["fc1"]                      # not fc10, not head.fc1
    assert select(names, ["fc1"], what="x") == ["fc1"]                         # an exact name is exact too
    with pytest.raises(ConfigError, match="'re:onv1' matches no layer"):      # no search inside the name
        select(names, ["re:onv1"], what="x")
    assert first_match("conv1.bn", {"re:conv1": 4, "re:conv1\\..*": 6}, 8) == 6
    assert first_match("fc10", {"re:fc1": 4}, 8) == 8


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"prune.layers: 'fc3' matches no layer; layers are: conv1, conv2, fc1, fc2"):
        select(NAMES, ["fc3"], what="prune.layers")


def test_invalid_regex_is_an_error():
    with pytest.raises(ConfigError, match="not a valid regex"):
        select(NAMES, ["re:("], what="x")


def test_first_match_uses_table_order_with_default():
    table = {"re:fc.*": 4, "*": 8}
    assert first_match("fc1", table, None) == 4
    assert first_match("conv1", table, None) == 8
    assert first_match("conv1", {"fc1": 2}, 8) == 8
