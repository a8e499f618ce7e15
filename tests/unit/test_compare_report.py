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


def _runs(shift: dict[str, float], teacher: tuple[str, ...] = ()) -> list:
    from rlrt_megatron.compare.report import RunRows

    out = []
    for algo, d in shift.items():
        for seed in range(3):
            rows = []
            for step in range(1, 7):
                row = {"step": step, "reward/mean": 0.1 * step + d + 0.01 * seed}
                if step % 3 == 0:
                    row["eval/average/avg@4"] = 0.5 + d + 0.02 * seed * (step == 6)
                if algo in teacher:
                    row.update({"teacher/frac_rows": 0.5, "delta/mean": -1.0 + 0.1 * seed})
                    row.update({"delta/abs_mean": 1.0, "delta/std": 2.0})
                rows.append(row)
            out.append(RunRows(algo, seed, rows))
    return out


def test_summary_reference_verdicts_and_teacher_table(tmp_path) -> None:
    from rlrt_megatron.compare.report import summarize, summary_markdown, write_csv

    runs = _runs({"grpo": 0.0, "rlrt": 0.05, "sdpo": -0.1}, teacher=("rlrt", "sdpo"))
    s = summarize(runs, ["grpo", "rlrt", "sdpo"])
    assert s.reference == "rlrt" and s.eval_key == "eval/average/avg@4"
    assert s.per_algorithm["rlrt"]["final_avg"]["values"] == pytest.approx([0.55, 0.57, 0.59])
    assert s.per_algorithm["grpo"]["reward_auc"]["mean"] == pytest.approx(0.36)
    v = s.versus["grpo"]["reward_auc"]  # rlrt - grpo = 0.05 on every seed
    assert v["mean_diff"] == pytest.approx(0.05) and v["a_wins"] == 3 and v["p"] < 1e-6
    md = summary_markdown(s, header=["# title", ""])
    assert md.startswith("# title") and "rlrt > grpo on 3/3 seeds" in md
    assert "rlrt > sdpo on 3/3 seeds" in md and "| rlrt | 3 | 0.570 ± 0.012 |" in md
    teacher = md.split("Teacher-side")[1]
    assert "| rlrt | 0.500 ± 0.000 | -0.900 ± 0.058 |" in teacher and "| grpo |" not in teacher
    # without rlrt the first algorithm is the reference
    assert summarize(runs, ["grpo", "sdpo"]).reference == "grpo"
    cols = write_csv(runs, str(tmp_path / "c.csv"))
    assert cols[:2] == ["reward/mean", "eval/average/avg@4"]
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert len(lines) == 1 + 9 * 6 and lines[1].startswith("grpo,0,1,")


def test_teacher_table_has_the_separation_and_the_eval_probe() -> None:
    from rlrt_megatron.compare.report import RunRows, summarize, summary_markdown, teacher_means

    rows = []
    for step in range(1, 21):
        row = {"step": step, "reward/mean": 0.2, "teacher/frac_rows": 0.3, "delta/mean": -0.1}
        row.update({"delta/correct_mean": 0.0, "delta/wrong_mean": -0.2 - 0.1 * (step > 10)})
        row["delta/gap"] = row["delta/correct_mean"] - row["delta/wrong_mean"]
        if step % 10 == 0:
            row["eval/teacher/synthetic/avg@8"] = 0.5
            row["eval/teacher/synthetic/student_avg@8"] = 0.3
        rows.append(row)
    m = teacher_means(rows)
    assert m["delta/gap@10"] == pytest.approx(0.2) and m["delta/gap"] == pytest.approx(0.25)
    assert m["eval/teacher/synthetic/avg@8"] == 0.5
    md = summary_markdown(summarize([RunRows("rlrt", 0, rows)], ["rlrt"]))
    table = md.split("Teacher-side")[1]
    assert "`delta/gap@10` | `eval/teacher/synthetic/avg@8` |" in table
    assert "| rlrt | 0.300 | -0.100 | 0.000 | -0.250 | 0.250 | 0.200 | 0.500 | 0.300 |" in table


def test_collapse_check_per_seed() -> None:
    from rlrt_megatron.compare.report import RunRows, summarize, summary_markdown

    def rows(first: float, last: float) -> list[dict]:
        return [{"step": s, "reward/mean": first if s <= 5 else last} for s in range(1, 16)]

    runs = [RunRows("sdpo", 0, rows(0.3, 0.29)), RunRows("sdpo", 1, rows(0.3, 0.2))]
    md = summary_markdown(summarize(runs, ["sdpo"]))
    assert "| sdpo | -0.010, -0.100 | 1/2 |" in md
