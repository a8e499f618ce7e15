"""`rlrt compare`'s statistics against closed forms and textbook values, and its verdicts."""

from __future__ import annotations

import math

import pytest

from rlrt_megatron.compare import stats
from rlrt_megatron.compare.report import run_numbers, verdict


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.7, 100.0])
def test_t_tail_matches_closed_forms(t: float) -> None:
    # df = 1 (Cauchy) and df = 2 have closed-form two-sided tails
    assert stats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)
    assert stats.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)


def test_t_quantiles_match_tables() -> None:
    table = {1: 12.7062, 2: 4.3027, 4: 2.7764, 10: 2.2281, 30: 2.0423}
    for df, q in table.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.95996, abs=1e-4)


def test_betainc_symmetry_and_edges() -> None:
    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 3.0, 0.7), (10.0, 0.5, 0.95)]:
        assert stats.betainc(a, b, x) == pytest.approx(1 - stats.betainc(b, a, 1 - x), abs=1e-12)
    assert stats.betainc(2.0, 3.0, 0.0) == 0.0 and stats.betainc(2.0, 3.0, 1.0) == 1.0
    # I_x(1, b) = 1 - (1 - x)^b
    assert stats.betainc(1.0, 3.0, 0.4) == pytest.approx(1 - 0.6**3, abs=1e-12)


def test_paired_t_test() -> None:
    a, b = [1.0, 2.0, 3.5], [0.5, 1.7, 2.9]
    r = stats.paired_t_test(a, b)
    d = [0.5, 0.3, 0.6]
    se = math.sqrt(sum((x - 0.4666666) ** 2 for x in d) / 2 / 3)
    assert r.mean_diff == pytest.approx(sum(d) / 3)
    assert r.se_diff == pytest.approx(se, rel=1e-5)
    assert r.t == pytest.approx(r.mean_diff / r.se_diff)
    assert r.p == pytest.approx(stats.t_two_sided_p(r.t, 2))
    assert 0.03 < r.p < 0.04  # t = 5.29, df = 2
    assert (r.a_wins, r.b_wins, r.ties) == (3, 0, 0)
    same = stats.paired_t_test([1.0, 2.0], [1.0, 2.0])
    assert (same.t, same.p, same.ties) == (0.0, 1.0, 2)
    shifted = stats.paired_t_test([2.0, 3.0], [1.0, 2.0])
    assert shifted.t == math.inf and shifted.p == 0.0
    assert math.isnan(stats.paired_t_test([1.0], [0.0]).p)


def test_verdict_words() -> None:
    def t(a_wins: int, b_wins: int, ties: int, p: float) -> dict:
        return {"n": a_wins + b_wins + ties, "a_wins": a_wins, "b_wins": b_wins, "ties": ties,
                "p": p}  # fmt: skip

    assert verdict("rlrt", "grpo", t(3, 0, 0, 0.0123)) == "rlrt > grpo on 3/3 seeds, p = 0.0123"
    assert verdict("rlrt", "sdpo", t(1, 2, 0, 0.5)) == "sdpo > rlrt on 2/3 seeds, p = 0.5"
    assert verdict("rlrt", "x", t(0, 0, 2, 1.0)) == "rlrt = x on all 2 seeds, p = 1"
    assert verdict("rlrt", "x", t(1, 1, 1, 0.9)).startswith("no winner")
    assert verdict("rlrt", "x", t(1, 0, 0, math.nan)).endswith("p n/a (one seed)")


def test_run_numbers() -> None:
    rows = [{"step": s, "reward/mean": s / 10} for s in range(1, 11)]
    rows[4]["eval/average/avg@8"] = 0.2
    rows[9]["eval/average/avg@8"] = 0.6
    n = run_numbers(rows, "eval/average/avg@8")
    assert n["final_avg"] == 0.6 and n["reward_auc"] == pytest.approx(0.55)
    assert n["reward_first5"] == pytest.approx(0.3) and n["reward_last5"] == pytest.approx(0.8)
