"""pass@k against the closed form on constructed cases."""

from __future__ import annotations

from math import comb

import pytest

from codeshell.eval.metrics import aggregate, pass_at_k


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (10, 3, 5), (20, 1, 10), (40, 7, 10),
                                   (200, 13, 100), (10, 10, 10), (10, 0, 10), (10, 1, 10), (100, 37, 1)])
def test_matches_the_formula(n, c, k):
    expected = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_special_cases():
    assert pass_at_k(40, 40, 1) == 1.0  # all correct
    assert pass_at_k(40, 0, 10) == 0.0  # none correct
    assert pass_at_k(10, 1, 10) == 1.0  # n = k: one correct sample is always drawn
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is the fraction correct


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)])
def test_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_aggregate_only_reports_k_up_to_n():
    scores = aggregate({"a": [True] * 10, "b": [False] * 9 + [True]})
    assert set(scores) == {"pass@1", "pass@10"}
    assert scores["pass@1"] == pytest.approx((1.0 + 0.1) / 2)
    assert scores["pass@10"] == pytest.approx(1.0)
    assert aggregate({"a": [True]}) == {"pass@1": 1.0}
    assert aggregate({}) == {}
