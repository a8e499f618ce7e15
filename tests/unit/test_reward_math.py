"""Math reward: answer extraction, math-verify equivalences, and the isolated worker pool."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rlrt_megatron.reward.math import MathReward, check_answer, extract_final_answer

POWER_TOWER = r"so the answer is \boxed{9^{9^{9^{9^9}}}}"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"first \boxed{1} then \boxed{ 71 }.", "71"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"nested \boxed{\frac{a}{\sqrt{b}}} end", r"\frac{a}{\sqrt{b}}"),
        (r"ok \boxed{3} and unbalanced \boxed{\frac{1}{2}", "3"),
        (r"\fbox{42}", "42"),
        (r"$\boxed 7$", "7"),
        ("reasoning...\nAnswer: $\\frac{3}{4}$\n", r"\frac{3}{4}"),
        ("Answer: 1\nmore\nanswer: 12.", "12"),
        ("we get 3, then 4, so 1,234 total", "1234"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_no_fallback_and_linear_on_huge_input():
    assert extract_final_answer("the result is 5", fallback_last_number=False) is None
    huge = "{" * 200_000 + r"\boxed{" * 50_000  # unbalanced everywhere, scanned in the tail only
    t0 = time.perf_counter()
    extract_final_answer(huge)
    assert time.perf_counter() - t0 < 5.0  # generous: linear scan, not quadratic


@pytest.mark.parametrize(
    "pred, gold, score",
    [
        ("0.5", r"\frac{1}{2}", 1.0),
        (r"\frac{1}{2}", "0.5", 1.0),
        (" 71 ", "71", 1.0),
        ("x=3", "3", 1.0),
        ("2,1", "1,2", 1.0),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", 1.0),
        ("1,000", "1000", 1.0),
        ("6", "5", 0.0),
        (r"\pi", "3", 0.0),
        ("$12$", "12", 1.0),
    ],
)
def test_check_answer_equivalences(pred, gold, score):
    status, got = check_answer(pred, gold)
    assert status == "ok"
    assert got == score


@pytest.fixture(scope="module")
def reward():
    # Generous per-sample limit: correctness tests must not flake on a loaded 2-core machine.
    with MathReward(timeout_s=10.0, num_workers=2) as r:
        yield r


@pytest.fixture(scope="module")
def strict():
    # A short limit for the tests that exercise timeouts (pathological samples).
    with MathReward(timeout_s=1.5, num_workers=2) as r:
        yield r


def test_reward_scores_a_batch(reward):
    comps = [
        r"... so the answer is \boxed{ 71 }",
        r"\boxed{\frac{1}{2}}",
        "Answer: 0.5",
        r"\boxed{x=3}",
        r"\boxed{6}",
        "I do not know.",
    ]
    refs = ["71", "0.5", r"\frac{1}{2}", "3", "5", "5"]
    res = reward.score(comps, refs)
    assert res.scores == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert res.n_parse_fail == 1 and res.n_timeout == 0 and res.n_error == 0
    assert res.answers[0] == "71"
    assert res.metrics()["reward/mean"] == pytest.approx(4 / 6)


def test_reward_adversarial_inputs_never_hang(strict):
    reward = strict
    nested = r"\boxed{" + r"\frac{" * 40 + "1" + "}{2}" * 40 + "}"
    comps = [
        POWER_TOWER,  # sympy evaluates the tower inside GMP: only a kill stops it
        r"\boxed{" + "9" * 10_000 + "}",  # longer than max_answer_chars: parse failure
        nested,
        "x" * 2_000_000 + r"\boxed{4}",  # huge string, answer at the end
        r"\boxed{\frac{1}{2}",  # unbalanced, then last-number fallback gives "2"
        "\udcff\x00\ufffd junk \x1b[31m \\boxed{\udcff}",
        r"\boxed{}}}}{{{",
        POWER_TOWER,
        r"\boxed{4}",
    ]
    refs = ["4"] * len(comps)
    t0 = time.monotonic()
    res = reward.score(comps, refs)
    elapsed = time.monotonic() - t0
    # Towers and the deep nest each cost <= 1.5 s + a restart: a generous bound, never minutes.
    assert elapsed < 30.0, elapsed
    assert 2 <= res.n_timeout <= 3  # the towers always; the deep \frac nest on a slow machine
    assert res.scores[0] == 0.0 and res.scores[7] == 0.0
    assert res.scores[1] == 0.0 and res.n_parse_fail >= 1
    assert res.scores[3] == 1.0 and res.scores[8] == 1.0
    assert res.scores[2] == 0.0 and res.scores[4] == 0.0 and res.scores[5] == 0.0
    assert len(res.scores) == len(comps)
    assert reward.n_restarts >= 2
    # The pool is healthy again and keeps scoring correctly.
    again = reward.score([r"\boxed{4}", r"\boxed{5}"], ["4", "4"])
    assert again.scores == [1.0, 0.0] and again.n_timeout == 0


def test_reward_one_sample_waits_at_most_the_timeout(strict):
    reward = strict
    """A step with one pathological sample returns within the timeout plus a restart."""
    reward.wait_ready()  # both workers warm
    t0 = time.monotonic()
    res = reward.score([POWER_TOWER] + [rf"\boxed{{{i}}}" for i in range(8)], ["0"] * 9)
    assert time.monotonic() - t0 < 10.0
    assert res.n_timeout == 1 and res.scores == [0.0, 1.0] + [0.0] * 7


def test_reward_replaces_a_dead_worker(reward):
    reward.wait_ready()
    assert all(w.ready for w in reward._workers)
    victim = reward._workers[0].proc.pid
    os.kill(victim, signal.SIGKILL)
    res = reward.score([rf"\boxed{{{i}}}" for i in range(4)], ["2"] * 4)
    assert res.scores == [0.0, 0.0, 1.0, 0.0] and res.n_error == 0, res
    assert all(w.proc.pid != victim for w in reward._workers), (victim, reward._workers)
    assert reward.health()


def test_reward_validates_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        MathReward(timeout_s=0)
    with MathReward(timeout_s=1.0, num_workers=1) as r:
        with pytest.raises(ValueError, match="one reference answer per completion"):
            r.score(["a"], [])
    with pytest.raises(RuntimeError, match="after close"):
        r.score([], [])
