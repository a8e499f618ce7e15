"""policy_loss, aggregation, generalized JSD / self-distillation and sampled-token distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rlrt_megatron.algorithms import (
    aggregate,
    append_tail_bucket,
    generalized_jsd,
    policy_loss,
    sampled_token_distillation_loss,
    self_distillation_loss,
)
from rlrt_megatron.algorithms.losses import clipped_is_weights

PROPS = settings(max_examples=30, deadline=None, derandomize=True)


def _ratios(*r: float) -> torch.Tensor:
    return torch.tensor([[math.log(x) for x in r]])


# ----------------------------------------------------------------------------- policy loss


def test_policy_loss_hand_computed_clip_higher() -> None:
    old = torch.zeros(1, 4)
    logp = _ratios(1.5, 0.9, 0.5, 1.1).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # per token: -min(1.5, 1.28) , -0.9 , -min(-0.5, -0.8) , -min(-1.1, -1.1)
    assert loss.item() == pytest.approx((-1.28 - 0.9 + 0.8 + 1.1) / 4, abs=1e-6)
    assert m["clipfrac"] == 0.5 and m["clipfrac_high"] == 0.25 and m["clipfrac_low"] == 0.25
    assert m["approx_kl"] == pytest.approx(-float(logp.detach().sum()) / 4, abs=1e-6)
    loss.backward()
    # clipped tokens get no gradient; others d(-rho A)/dlogp = -rho A / N
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.9, 0.0, 1.1]]) / 4)
    # symmetric clip 0.2 clips the positive token at 1.2 instead of 1.28
    sym, _ = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert sym.item() == pytest.approx((-1.2 - 0.9 + 0.8 + 1.1) / 4, abs=1e-6)
    # clip-higher lets a ratio of 1.25 through (unclipped) while 0.2 / 0.2 clips it
    r = _ratios(1.25)
    hi, mh = policy_loss(r, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    lo, ml = policy_loss(r, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), eps_high=0.2)
    assert float(hi) == pytest.approx(-1.25) and mh["clipfrac"] == 0.0
    assert float(lo) == pytest.approx(-1.2) and ml["clipfrac"] == 1.0


def test_dual_clip() -> None:
    logp = _ratios(5.0, 5.0, 0.5)
    adv = torch.tensor([[-1.0, 1.0, -2.0]])
    loss, m = policy_loss(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=3.0)
    # A<0, rho 5: max(5, 1.28) = 5 -> min(5, 3) = 3; A>0 rho 5: -1.28; A<0 rho .5: 2*.8 = 1.6
    assert loss.item() == pytest.approx((3.0 - 1.28 + 1.6) / 3, abs=1e-6)
    assert m["dual_clipfrac"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=0.5)


def test_aggregation_weights_tokens_equally() -> None:
    # rows of length 1 and 3, ratio 1 so the per-token loss is -A
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([[4.0, 0, 0], [1.0, 2.0, 3.0]])
    logp = torch.zeros(2, 3, requires_grad=True)
    tm, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, agg="token-mean")
    assert tm.item() == pytest.approx(-(4 + 1 + 2 + 3) / 4)
    sm, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, agg="seq-mean-token-mean")
    assert sm.item() == pytest.approx(-(4 + 2) / 2)
    ss, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, agg="seq-mean-token-sum")
    assert ss.item() == pytest.approx(-(4 + 6) / 2)
    # gradient per token with A = 1 everywhere: token-mean gives -1/N to every token whatever
    # its sequence length; seq-mean-token-mean gives -1/(B len_i)
    ones = torch.ones(2, 3)
    (g_tm,) = torch.autograd.grad(policy_loss(logp, torch.zeros(2, 3), ones, mask)[0], logp)
    torch.testing.assert_close(g_tm, -mask / 4)
    (g_sm,) = torch.autograd.grad(
        policy_loss(logp, torch.zeros(2, 3), ones, mask, agg="seq-mean-token-mean")[0], logp
    )
    torch.testing.assert_close(g_sm, -torch.tensor([[1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]]))
    # mini-batch normalisers: explicit counts override the local ones
    part, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, num_tokens=8.0)
    assert part.item() == pytest.approx(-10 / 8)
    part, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, agg="seq-mean-token-sum", num_seqs=5)
    assert part.item() == pytest.approx(-10 / 5)
    # an all-masked batch is 0, not NaN
    empty, _ = policy_loss(logp, torch.zeros(2, 3), adv, torch.zeros(2, 3))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="agg"):
        aggregate(torch.zeros(2, 3), mask, "sum")


def naive_policy_loss(logp, old, adv, mask, eps_low, eps_high, agg):
    """Independent float64 reference: loops over rows, textbook formula."""
    rows = []
    total, n = 0.0, 0
    for i in range(logp.shape[0]):
        seq = []
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            obj = torch.min(
                ratio * adv[i, t], torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[i, t]
            )
            seq.append(-obj)
        if seq:
            rows.append(sum(seq) / len(seq))
            total = total + sum(seq)
            n += len(seq)
    if agg == "token-mean":
        return total / n
    return sum(rows) / len(rows)


@PROPS
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["token-mean", "seq-mean-token-mean"]),
)
def test_policy_loss_grad_matches_naive_and_masked_junk(
    b: int, t: int, seed: int, agg: str
) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[0, 0] = 1.0
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, agg)
    (grad,) = torch.autograd.grad(loss, logp)
    ref = naive_policy_loss(logp, old, adv, mask, 0.2, 0.28, agg)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    # garbage at masked positions changes neither the loss nor any gradient
    junk = torch.where(mask > 0, 0.0, float("nan"))
    logp2 = (logp.detach() + torch.where(mask > 0, 0.0, 1e6)).requires_grad_()
    loss2, _ = policy_loss(logp2, old + junk, adv + junk, mask, 0.2, 0.28, agg)
    (grad2,) = torch.autograd.grad(loss2, logp2)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
    assert (grad2[mask == 0] == 0).all()


def test_policy_loss_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g) * 2
    # log-ratios away from the clip kinks (log 0.8, log 1.28) by more than h
    lr = torch.tensor([-0.5, -0.1, 0.05, 0.1, 0.4]).repeat(3, 1)
    logp = old + lr
    adv = torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    x = logp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(policy_loss(x, old, adv, mask)[0], x)
    h = 1e-3
    fd = torch.zeros_like(logp)
    for i in range(3):
        for t in range(5):
            e = torch.zeros_like(logp)
            e[i, t] = h
            up = policy_loss(logp + e, old, adv, mask)[0]
            dn = policy_loss(logp - e, old, adv, mask)[0]
            fd[i, t] = (up - dn) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=2e-3, atol=2e-4)
    assert (grad[0] != 0).any() and (grad[mask == 0] == 0).all()


def test_no_gradient_into_advantages_or_old_logprobs() -> None:
    logp = torch.randn(2, 3, requires_grad=True)
    old = torch.randn(2, 3, requires_grad=True)
    adv = torch.randn(2, 3, requires_grad=True)
    loss, _ = policy_loss(logp, old, adv, torch.ones(2, 3))
    loss.backward()
    assert logp.grad is not None and old.grad is None and adv.grad is None


def test_policy_loss_bf16_and_sequence_advantages() -> None:
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(2, 4, generator=g), -torch.rand(2, 4, generator=g)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 4)
    full, _ = policy_loss(logp, old, adv[:, None].expand(2, 4), mask)
    seq, _ = policy_loss(logp, old, adv, mask)
    assert torch.equal(full, seq)
    b16, _ = policy_loss(logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask.bfloat16())
    assert b16.dtype == torch.float32
    torch.testing.assert_close(b16, full, rtol=2e-2, atol=2e-2)


def test_policy_loss_invalid_inputs() -> None:
    z, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"old_logprobs.*\(2, 4\).*mask.*\(2, 3\)"):
        policy_loss(z, torch.zeros(2, 4), z, m)
    with pytest.raises(ValueError, match=r"advantages.*\(3,\)"):
        policy_loss(z, z, torch.zeros(3), m)
    bad = z.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`logprobs` \(2, 3\).*NaN"):
        policy_loss(bad, z, z, m)
    with pytest.raises(ValueError, match="mask.*2-D"):
        policy_loss(z, z, z, torch.ones(6))


# ----------------------------------------------------------------------------- distillation


def _dists(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64), -1),
        torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 2, -1),
    )


def test_generalized_jsd_endpoints_and_mixture() -> None:
    s, t = _dists((3, 4, 7), 0)
    ps, pt = s.exp(), t.exp()
    fwd = (pt * (t - s)).sum(-1)  # KL(teacher || student): forward KL
    rev = (ps * (s - t)).sum(-1)  # KL(student || teacher): reverse KL
    torch.testing.assert_close(generalized_jsd(s, t, 0.0).double(), fwd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0).double(), rev, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        F.kl_div(s, t, log_target=True, reduction="none").sum(-1), fwd
    )  # forward KL is torch's kl_div(student, teacher)
    for beta in (0.25, 0.5, 0.9):
        pm = beta * pt + (1 - beta) * ps
        ref = beta * (pt * (t - pm.log())).sum(-1) + (1 - beta) * (ps * (s - pm.log())).sum(-1)
        torch.testing.assert_close(generalized_jsd(s, t, beta).double(), ref, rtol=1e-5, atol=1e-6)
    half = generalized_jsd(s, t, 0.5)
    torch.testing.assert_close(half, generalized_jsd(t, s, 0.5))  # symmetric at 1/2
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()
    assert generalized_jsd(s, s, 0.3).abs().max() < 1e-6
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


def test_self_distillation_full_distribution_empty_tail() -> None:
    """K = V: the tail bucket is empty (-inf); loss = forward / reverse KL token means."""
    s, t = _dists((2, 3, 6), 1)
    inf = torch.full((2, 3, 1), float("-inf"), dtype=torch.float64)
    s_k, t_k = torch.cat([s, inf], -1), torch.cat([t, inf], -1)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    for beta, ref in ((0.0, ((t.exp()) * (t - s)).sum(-1)), (1.0, (s.exp() * (s - t)).sum(-1))):
        x = s_k.clone().requires_grad_()
        loss, _ = self_distillation_loss(x, t_k, mask, beta=beta)
        assert loss.item() == pytest.approx(float((ref * mask).sum() / 5), rel=1e-5)
        loss.backward()
        assert torch.isfinite(x.grad).all() and (x.grad[..., -1] == 0).all()


def test_self_distillation_gradients_wrt_logits() -> None:
    """Forward KL's gradient w.r.t. the student logits is (p_S - p_T) / N; reverse KL's is
    p_S (log p_S - log p_T - KL)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 5, generator=g, requires_grad=True)
    t = torch.log_softmax(torch.randn(1, 2, 5, generator=g), -1)
    tail = torch.full((1, 2, 1), float("-inf"))
    mask = torch.ones(1, 2)
    s = torch.log_softmax(logits, -1)
    loss, _ = self_distillation_loss(torch.cat([s, tail], -1), torch.cat([t, tail], -1), mask, 0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, (s.exp() - t.exp()).detach() / 2, rtol=1e-5, atol=1e-6)
    s = torch.log_softmax(logits, -1)
    loss, _ = self_distillation_loss(torch.cat([s, tail], -1), torch.cat([t, tail], -1), mask, 1.0)
    (grad,) = torch.autograd.grad(loss, logits)
    ps = s.exp().detach()
    kl = (ps * (s.detach() - t)).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, ps * (s.detach() - t - kl) / 2, rtol=1e-5, atol=1e-6)


def test_self_distillation_weights_mask_and_no_teacher_grad() -> None:
    s, t = _dists((2, 3, 4), 3)
    s = s.float().requires_grad_()
    t = t.float().requires_grad_()
    mask = torch.tensor([[1.0, 1, 0], [0, 1, 1]])
    base, m0 = self_distillation_loss(s, t, mask, 0.5)
    jsd = generalized_jsd(s, t, 0.5).detach()
    assert base.item() == pytest.approx(float((jsd * mask).sum() / 4), rel=1e-5)
    assert m0["jsd_mean"] == pytest.approx(base.item(), rel=1e-5)
    w = torch.tensor([[2.0, 0.5, 7.0], [9.0, 1.0, 1.5]])
    weighted, m1 = self_distillation_loss(s, t, mask, 0.5, is_weights=w, num_tokens=10)
    assert weighted.item() == pytest.approx(float((jsd * mask * w).sum() / 10), rel=1e-5)
    assert m1["is_weight_mean"] == pytest.approx((2 + 0.5 + 1 + 1.5) / 4)
    weighted.backward()
    assert t.grad is None and s.grad is not None
    assert (s.grad[mask == 0] == 0).all() and (s.grad[mask > 0] != 0).any()
    # NaN under the mask is ignored
    s2 = s.detach().clone()
    s2[0, 2] = float("nan")
    same, _ = self_distillation_loss(s2, t.detach(), mask, 0.5)
    assert torch.equal(same, base.detach())
    s2[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"student_topk_logprobs` \(2, 3, 4\).*NaN.*\(0, 1, 0\)"):
        self_distillation_loss(s2, t, mask)
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs.*\(2, 3, 5\)"):
        self_distillation_loss(s, torch.zeros(2, 3, 5), mask)


def test_append_tail_bucket() -> None:
    p = torch.tensor([[0.5, 0.2, 0.1]])
    out = append_tail_bucket(p.log())
    torch.testing.assert_close(out.exp(), torch.tensor([[0.5, 0.2, 0.1, 0.2]]))
    full = append_tail_bucket(torch.tensor([[0.25, 0.75]]).log())
    assert torch.isfinite(full).all() and float(full[0, -1].exp()) < 1e-6


def test_clipped_is_weights() -> None:
    logp = _ratios(0.5, 1.5, 3.0, 100.0)
    w = clipped_is_weights(logp, torch.zeros(1, 4), torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5, 2.0, 0.0]]))


def test_sampled_token_distillation() -> None:
    s = torch.tensor([[-0.5, -1.0, -2.0]], requires_grad=True)
    t = torch.tensor([[-1.0, -1.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = sampled_token_distillation_loss(s, t, mask)
    assert loss.item() == pytest.approx((0.5 * -0.5 + 0.0) / 2)
    assert m["logp_diff"] == pytest.approx(0.25)
    loss.backward()
    # gradient (s - tau) / N: the sampled-token estimate of grad KL(pi_S || pi_T)
    torch.testing.assert_close(s.grad, torch.tensor([[0.25, 0.0, 0.0]]))
    assert t.grad is None
    with pytest.raises(ValueError, match=r"teacher_logprobs.*\(1, 2\)"):
        sampled_token_distillation_loss(s, torch.zeros(1, 2), mask)


@PROPS
@given(st.integers(1, 9), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1), st.booleans())
def test_generalized_jsd_properties(k: int, beta: float, seed: int, empty_tail: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(3, k + 1, generator=g) * 3, -1)
    t = torch.log_softmax(torch.randn(3, k + 1, generator=g) * 3, -1)
    if empty_tail:
        s = torch.cat([torch.log_softmax(s[:, :k], -1), torch.full((3, 1), float("-inf"))], -1)
    x = s.clone().requires_grad_()
    d = generalized_jsd(x, t, beta)
    assert torch.isfinite(d).all() and (d >= -1e-5).all()
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert generalized_jsd(t, t, beta).abs().max() < 1e-5
    # JSD_beta(S, T) = JSD_{1 - beta}(T, S)
    torch.testing.assert_close(d.detach(), generalized_jsd(t, s, 1.0 - beta), rtol=1e-4, atol=1e-5)
