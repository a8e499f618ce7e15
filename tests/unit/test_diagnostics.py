"""asymmetry_stats, top_explore_tokens, position_kl on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from rlrt_megatron.algorithms import asymmetry_stats, position_kl, top_explore_tokens

L = math.log


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # row 0 correct: w = pi_S / pi_T = [1, 3, 0.4]; row 1 incorrect, last token masked (junk)
    s = torch.tensor([[L(0.5), L(0.9), L(0.2)], [L(0.4), L(0.4), float("nan")]])
    t = torch.tensor([[L(0.5), L(0.3), L(0.5)], [L(0.2), L(0.8), 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return s, t, mask, torch.tensor([1.0, 0.0])


def test_asymmetry_stats_hand_computed() -> None:
    stats = asymmetry_stats(*batch())
    d_correct = [0.0, L(1 / 3), L(2.5)]
    expect = {
        "delta_mean": (sum(d_correct) + L(0.5) + L(2.0)) / 5,
        "delta_mean_correct": sum(d_correct) / 3,
        "delta_mean_incorrect": 0.0,
        "frac_delta_neg_correct": 1 / 3,
        "frac_delta_neg_incorrect": 1 / 2,
        "w_mean_correct": (1 + 3 + 0.4) / 3,
        "frac_clipped_correct": 2 / 3,
        "frac_clip_high_correct": 1 / 3,
        "frac_clip_low_correct": 1 / 3,
        "sampled_kl_student_teacher": -(sum(d_correct) + L(0.5) + L(2.0)) / 5,
        "tokens_correct": 3.0,
        "tokens_incorrect": 2.0,
    }
    assert set(stats) == set(expect)
    for k, v in expect.items():
        assert stats[k] == pytest.approx(v, abs=1e-6), k
    # no correct rollout: means over the empty set are 0 with a zero count, never NaN
    s, t, mask, _ = batch()
    none = asymmetry_stats(s, t, mask, torch.zeros(2))
    assert none["tokens_correct"] == 0.0 and none["w_mean_correct"] == 0.0
    assert all(math.isfinite(v) for v in none.values())


def test_asymmetry_stats_invalid() -> None:
    s, t, mask, r = batch()
    with pytest.raises(ValueError, match=r"rewards.*\(3,\)"):
        asymmetry_stats(s, t, mask, torch.ones(3))
    with pytest.raises(ValueError, match=r"teacher_logprobs.*\(2, 2\)"):
        asymmetry_stats(s, t[:, :2], mask, r)


def test_top_explore_tokens() -> None:
    s, t, mask, r = batch()
    ids = torch.tensor([[11, 12, 13], [21, 22, 23]])
    top = top_explore_tokens(s, t, mask, r, token_ids=ids, k=2)
    assert [(x["row"], x["pos"], x["token_id"]) for x in top] == [(0, 1, 12), (0, 0, 11)]
    assert top[0]["w"] == pytest.approx(3.0, rel=1e-5)
    assert top[0]["delta"] == pytest.approx(L(1 / 3), rel=1e-5)
    assert top[1]["w"] == pytest.approx(1.0)
    assert len(top_explore_tokens(s, t, mask, r, k=10)) == 3  # only correct-rollout tokens
    assert top_explore_tokens(s, t, mask, torch.zeros(2)) == []


def test_position_kl() -> None:
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    q = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]).log()
    kl0 = 0.5 * L(0.5 / 0.25) + 0.5 * L(0.5 / 0.75)
    kl1 = 0.9 * L(0.9 / 0.5) + 0.1 * L(0.1 / 0.5)
    assert position_kl(p, q, torch.tensor([[1, 1]])) == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert position_kl(p, q, torch.tensor([[1, 0]])) == pytest.approx(kl0, rel=1e-5)
