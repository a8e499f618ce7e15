"""pass@k (unbiased estimator) against brute-force enumeration of all k-subsets; avg@k."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from rlrt_megatron.eval import avg_at_k, pass_at_k
from rlrt_megatron.eval.metrics import mean_over, pass_ks, summarize_problems


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the C(n, k) k-subsets of n samples (c correct) that hold a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if any(samples[i] for i in s))
    return Fraction(hits, len(subsets))


CASES = [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)]


@pytest.mark.parametrize(("n", "c", "k"), CASES)
def test_pass_at_k_matches_brute_force(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(1000, 3, 100), (500, 1, 250), (2048, 17, 1024)])
def test_pass_at_k_large_n_matches_exact_binomials(n: int, c: int, k: int) -> None:
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 = c / n
    assert pass_at_k(16, 1, 16) == 1.0  # n - c < k: every subset holds the correct sample


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_avg_at_k_and_summary() -> None:
    assert avg_at_k([1, 0, 0, 1]) == 0.5
    with pytest.raises(ValueError, match="no scores"):
        avg_at_k([])
    s = summarize_problems([(4, 0), (4, 1), (4, 4)], k=4)
    assert s["n_problems"] == 3
    assert s["avg@4"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert s["pass@2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert pass_ks(16) == [1, 2, 4, 8, 16]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert mean_over([{"a": 1.0}, {"a": 3.0, "b": 2.0}], ["a", "b"]) == {"a": 2.0, "b": 2.0}
