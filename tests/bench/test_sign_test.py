"""The benches' paired test (bench/common.py): exact two-sided sign test values."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from common import sign_test  # noqa: E402


def test_sign_test_is_the_exact_two_sided_binomial_tail():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(3, 3) == 1.0   # capped: both tails overlap at the middle
    # the repairs table's bias correction row: 30 fixed, 38 broken
    assert sign_test(30, 38) == pytest.approx(2 * sum(math.comb(68, i) for i in range(31)) / 2 ** 68)
    assert 0.39 < sign_test(30, 38) < 0.41
    assert sign_test(65, 22) < 1e-5
