"""pass@k against hand-computed binomials."""

import math

import pytest

from rlhf.eval.passk import mean_pass_at_k, pass_at_k, pass_at_k_table


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair holds a pass
        (10, 0, 3, 0.0),  # nothing passes
        (4, 1, 4, 1.0),  # k = n: the one pass is always drawn
        (1000, 1, 100, 0.1),  # 1 - C(999,100)/C(1000,100) = 1 - 900/1000
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_product_form_matches_binomials():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_large_n_is_finite():
    # C(2000, 500) overflows a float; the product form does not.
    value = pass_at_k(2000, 3, 500)
    assert 0.0 < value < 1.0 and math.isfinite(value)


def test_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_aggregation_over_problems():
    outcomes = {"a": [True, False], "b": [False, False], "c": [True, True, True]}
    # pass@1: a 1/2, b 0, c 1 -> (0.5 + 0 + 1) / 3 = 0.5
    assert mean_pass_at_k(outcomes.values(), 1) == pytest.approx(0.5)
    # pass@2: a 1 - C(1,2)/C(2,2) = 1, b 0, c 1 -> 2/3; pass@3 is left out (a and b have 2 samples)
    table = pass_at_k_table(outcomes, ks=[1, 2, 3])
    assert table == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(2 / 3)}
