"""group_advantages, rlrt_advantages, rlsd_advantages, lambda_schedule, dapo_keep_mask."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlrt_megatron.algorithms import (
    dapo_keep_mask,
    group_advantages,
    lambda_schedule,
    rlrt_advantages,
    rlsd_advantages,
)

PROPS = settings(max_examples=40, deadline=None, derandomize=True)
L = math.log


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_hand_computed() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    a = group_advantages(r, 4)
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: identical -> 0; group 2: mean .25
    s0 = math.sqrt(1.0 / 3.0)
    s2 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)
    expect = [0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6)] * 1
    expect = [expect[0], expect[1], expect[1], expect[0]] + [0.0] * 4
    expect += [-0.25 / (s2 + 1e-6)] * 3 + [0.75 / (s2 + 1e-6)]
    torch.testing.assert_close(a, torch.tensor(expect), rtol=1e-6, atol=1e-7)
    dr = group_advantages(r, 4, scale_by_std=False)
    torch.testing.assert_close(dr[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert (group_advantages(r, 1) == 0).all()


@PROPS
@given(
    st.integers(1, 5),
    st.integers(1, 6),
    st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0, 0.1, 2.5]), min_size=30, max_size=30),
    st.booleans(),
    st.floats(-3, 3, allow_nan=False, width=32),
)
def test_group_advantages_properties(
    n_groups: int, g: int, vals: list[float], scale: bool, const: float
) -> None:
    r = torch.tensor(vals[: n_groups * g])
    a = group_advantages(r, g, scale_by_std=scale)
    assert torch.isfinite(a).all()
    sums = a.view(n_groups, g).sum(1)
    torch.testing.assert_close(sums, torch.zeros(n_groups), atol=1e-4, rtol=0)
    # identical rewards -> exactly zero, and a shift of all rewards changes nothing
    same = group_advantages(torch.full((n_groups * g,), const), g, scale_by_std=scale)
    assert (same == 0).all()
    torch.testing.assert_close(group_advantages(r + 2.0, g, scale), a, atol=1e-4, rtol=1e-4)


def test_group_advantages_invalid() -> None:
    with pytest.raises(ValueError, match=r"rewards.*\(6,\).*group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=r"rewards.*1-D.*\(2, 3\)"):
        group_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="rewards.*NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)


def test_dapo_keep_mask() -> None:
    r = torch.tensor([1.0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    assert dapo_keep_mask(r, 4).tolist() == [True] * 4 + [False] * 8
    with pytest.raises(ValueError, match=r"\(5,\)"):
        dapo_keep_mask(torch.zeros(5), 2)


# ----------------------------------------------------------------------------- RLRT


def _lp(*p: float) -> list[float]:
    return [L(x) for x in p]


def test_rlrt_hand_computed() -> None:
    # row 0 correct (A > 0), row 1 incorrect, row 2 correct but no teacher, row 3 correct A < 0
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    s = torch.tensor([_lp(0.5, 0.9, 0.2, 0.6)] * 4)
    tau = torch.tensor([_lp(0.5, 0.3, 0.5, 0.6)] * 4)
    mask = torch.tensor([[1, 1, 1, 0]] * 4)
    has = torch.tensor([True, True, False, True])
    out = rlrt_advantages(adv, rewards, s, tau, mask, alpha=1.0, eps_w=0.2, has_teacher=has)
    # w = pi_S / pi_T = [1, 3, 0.4] -> clip [1, 1.2, 0.8]; A < 0: w = pi_T / pi_S = [1, 1/3, 2.5]
    expect = torch.tensor(
        [
            [1.0, 1.2, 0.8, 0.0],
            [-0.5, -0.5, -0.5, 0.0],
            [2.0, 2.0, 2.0, 0.0],
            [-1.0, -0.8, -1.2, 0.0],
        ]
    )
    torch.testing.assert_close(out, expect)
    half = rlrt_advantages(adv, rewards, s, tau, mask, alpha=0.5, eps_w=0.2, has_teacher=has)
    torch.testing.assert_close(half[0], torch.tensor([1.0, 1.1, 0.9, 0.0]))
    # RLRT-all ablation: the incorrect row is reshaped too (A < 0: w = pi_T / pi_S)
    ungated = rlrt_advantages(adv, rewards, s, tau, mask, reward_gate=False)
    torch.testing.assert_close(ungated[1], torch.tensor([-0.5, -0.4, -0.6, 0.0]))


@st.composite
def token_batch(draw: st.DrawFn) -> dict:
    b = draw(st.integers(1, 6))
    t = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    return {
        "advantages": torch.randn(b, generator=g) * 2,
        "rewards": (torch.rand(b, generator=g) > 0.5).float(),
        "student_logprobs": -torch.rand(b, t, generator=g) * 4,
        "teacher_logprobs": -torch.rand(b, t, generator=g) * 4,
        "mask": mask,
        "has_teacher": torch.rand(b, generator=g) > 0.2,
        "alpha": draw(st.floats(0.0, 1.0)),
        "eps_w": draw(st.floats(0.0, 0.9)),
        "seed": seed,
    }


@PROPS
@given(token_batch())
def test_rlrt_properties(d: dict) -> None:
    seed = d.pop("seed")
    out = rlrt_advantages(**d)
    a, m, alpha, eps = d["advantages"], d["mask"], d["alpha"], d["eps_w"]
    assert out.dtype == torch.float32 and not out.requires_grad
    # alpha = 0 is GRPO exactly
    zero = rlrt_advantages(**{**d, "alpha": 0.0})
    assert torch.equal(zero, a[:, None] * m)
    # incorrect rollouts and rollouts without teacher are untouched, bit for bit
    keep = (d["rewards"] <= 0.5) | ~d["has_teacher"]
    assert torch.equal(out[keep], (a[:, None] * m)[keep])
    # bounds A (1 - alpha eps_w) .. A (1 + alpha eps_w)
    lo = torch.minimum(a * (1 - alpha * eps), a * (1 + alpha * eps))[:, None] * m
    hi = torch.maximum(a * (1 - alpha * eps), a * (1 + alpha * eps))[:, None] * m
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
    # direction: on correct rows with A > 0, up-weighted exactly where the student beat the teacher
    delta = d["teacher_logprobs"] - d["student_logprobs"]
    sel = (~keep & (a > 0))[:, None] & (m > 0) & (delta.abs() > 1e-4)
    if alpha > 1e-3 and eps > 1e-3:
        assert torch.equal((out > a[:, None])[sel], (delta < 0)[sel])
    # masked positions never matter: fill them with garbage
    g = torch.Generator().manual_seed(seed + 1)
    junk = torch.where(m > 0, 0.0, float("nan"))
    noisy = {
        **d,
        "student_logprobs": d["student_logprobs"] + junk,
        "teacher_logprobs": d["teacher_logprobs"]
        + torch.where(m > 0, 0.0, 9.0)
        + torch.randn(m.shape, generator=g) * (1 - m),
    }
    assert torch.equal(rlrt_advantages(**noisy), out)


def test_rlrt_no_gradient_and_bf16() -> None:
    s = torch.tensor([[-0.1, -2.0, -0.5]], requires_grad=True)
    tau = torch.tensor([[-0.3, -1.0, -0.5]], requires_grad=True)
    adv = torch.tensor([0.7], requires_grad=True)
    out = rlrt_advantages(adv, torch.ones(1), s, tau, torch.ones(1, 3))
    assert not out.requires_grad and out.grad_fn is None
    b16 = rlrt_advantages(
        adv.bfloat16(), torch.ones(1), s.bfloat16(), tau.bfloat16(), torch.ones(1, 3)
    )
    assert b16.dtype == torch.float32
    torch.testing.assert_close(b16, out.detach(), rtol=1e-2, atol=1e-2)


def test_rlrt_invalid_inputs() -> None:
    a, r, m = torch.ones(2), torch.ones(2), torch.ones(2, 3)
    s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"teacher_logprobs.*\(2, 4\).*mask.*\(2, 3\)"):
        rlrt_advantages(a, r, s, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match=r"advantages.*\(3,\)"):
        rlrt_advantages(torch.ones(3), r, s, t, m)
    with pytest.raises(ValueError, match=r"rewards.*\(2, 1\)"):
        rlrt_advantages(a, torch.ones(2, 1), s, t, m)
    bad = s.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"student_logprobs.*\(2, 3\).*NaN.*\(1, 2\)"):
        rlrt_advantages(a, r, bad, t, m)
    m2 = m.clone()
    m2[1, 2] = 0
    rlrt_advantages(a, r, bad, t, m2)  # NaN under the mask is fine
    with pytest.raises(ValueError, match="mask.*0 and 1"):
        rlrt_advantages(a, r, s, t, m * 2)


# ----------------------------------------------------------------------------- RLSD


def test_rlsd_hand_computed() -> None:
    adv = torch.tensor([1.0, -2.0])
    s = torch.tensor([_lp(0.5, 0.9, 0.2)] * 2)
    tau = torch.tensor([_lp(0.5, 0.3, 0.5)] * 2)
    out = rlsd_advantages(adv, s, tau, torch.ones(2, 3), eps_w=0.2, lam=0.5)
    # A > 0: w = pi_T / pi_S = [1, 1/3, 2.5] -> [1, .8, 1.2]; factor .5 + .5 w
    # A < 0: w = pi_S / pi_T = [1, 3, .4] -> [1, 1.2, .8]
    expect = torch.tensor([[1.0, 0.9, 1.1], [-2.0, -2.2, -1.8]])
    torch.testing.assert_close(out, expect)
    none = rlsd_advantages(adv, s, tau, torch.ones(2, 3), has_teacher=torch.tensor([False, True]))
    torch.testing.assert_close(none[0], torch.ones(3))


@PROPS
@given(token_batch(), st.floats(0.01, 1.0))
def test_rlsd_properties(d: dict, lam: float) -> None:
    a, m, eps = d["advantages"], d["mask"], d["eps_w"]
    s, tau = d["student_logprobs"], d["teacher_logprobs"]
    out = rlsd_advantages(a, s, tau, m, eps_w=eps, lam=lam)
    # recover the weight: Ahat = A ((1 - lam) + lam w)
    sel = (m > 0) & (a.abs() > 1e-3)[:, None]
    w = (out / a[:, None] - (1 - lam)) / lam
    assert (w[sel] >= 1 - eps - 1e-3).all() and (w[sel] <= 1 + eps + 1e-3).all()
    # follows sign(A): w > 1 exactly where sign(A) * Delta > 0
    delta = tau - s
    strict = sel & (delta.abs() > 1e-3) & (eps > 1e-2)
    assert torch.equal((w > 1)[strict], (torch.sign(a)[:, None] * delta > 0)[strict])
    assert (out[m == 0] == 0).all()
    assert torch.equal(rlsd_advantages(a, s, tau, m, eps_w=eps, lam=0.0), a[:, None] * m)


def test_lambda_schedule() -> None:
    assert lambda_schedule(0) == 0.5
    assert lambda_schedule(25) == pytest.approx(0.25)
    assert lambda_schedule(50) == 0.0 and lambda_schedule(500) == 0.0
    assert lambda_schedule(10, init=1.0, decay_steps=20) == pytest.approx(0.5)
    assert lambda_schedule(1000, decay_steps=None) == 0.5
    with pytest.raises(ValueError, match="decay_steps"):
        lambda_schedule(1, decay_steps=0)
    with pytest.raises(ValueError, match="step"):
        lambda_schedule(-1)
