"""Single-process checks of megatron/logprobs.py against naive full-vocabulary references."""

from __future__ import annotations

import pytest
import torch

from rlrt_megatron.megatron.logprobs import (
    vocab_parallel_kl,
    vocab_parallel_logprobs,
    vocab_parallel_topk_logprobs,
)

V_TRUE, V_PAD = 1000, 1024  # 1000 is not a multiple of 128: 24 padded columns


def _logits(t: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, V_PAD, generator=g) * 3
    x[:, V_TRUE:] = 50.0  # padding columns would dominate the softmax if they leaked in
    return x.to(dtype)


def naive_logprobs(logits, target, v=V_TRUE):
    lsm = torch.log_softmax(logits[..., :v].float(), -1)
    return lsm.gather(-1, target[..., None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


@pytest.mark.parametrize(
    "dtype,tol,chunk",
    [(torch.float32, 1e-5, None), (torch.float32, 1e-5, 7), (torch.bfloat16, 2e-2, 5)],
)
def test_logprobs_entropy_and_grads_match_naive(dtype, tol, chunk):
    x = _logits(23, dtype)
    tgt = torch.randint(0, V_TRUE, (23,), generator=torch.Generator().manual_seed(1))
    g_lp, g_h = torch.randn(23), torch.randn(23)

    a = x.clone().requires_grad_()
    lp, h = vocab_parallel_logprobs(
        a, tgt, chunk_size=chunk, with_entropy=True, true_vocab_size=V_TRUE
    )
    (lp * g_lp + h * g_h).sum().backward()

    b = x.clone().requires_grad_()
    lp_ref, h_ref = naive_logprobs(b, tgt)
    (lp_ref * g_lp + h_ref * g_h).sum().backward()

    assert lp.dtype == torch.float32 and lp.shape == (23,)
    torch.testing.assert_close(lp, lp_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(h, h_ref, atol=tol, rtol=tol)
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert torch.all(a.grad[:, V_TRUE:] == 0)


def test_logprobs_inplace_backward_and_leading_dims():
    x = _logits(12).view(3, 4, V_PAD)
    tgt = torch.randint(0, V_TRUE, (3, 4))
    a = x.clone().requires_grad_()
    # A non-leaf (like the LM head's output) is what inplace_backward is meant for.
    a2 = a * 1.0
    lp = vocab_parallel_logprobs(
        a2, tgt, chunk_size=5, true_vocab_size=V_TRUE, inplace_backward=True
    )
    lp.sum().backward()
    b = x.clone().requires_grad_()
    lp_ref, _ = naive_logprobs(b, tgt)
    lp_ref.sum().backward()
    assert lp.shape == (3, 4)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_logprobs_no_grad_path_and_bad_target():
    x = _logits(4)
    tgt = torch.tensor([0, 1, 2, 999])
    with torch.no_grad():
        lp = vocab_parallel_logprobs(x, tgt, true_vocab_size=V_TRUE)
    torch.testing.assert_close(lp, naive_logprobs(x, tgt)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="target ids must lie"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1, 2, 1000]), true_vocab_size=V_TRUE)


def naive_topk(s, t, k, v=V_TRUE, ids=None):
    """Full-vocab reference; `ids` given: use that support (bf16 logits have ties in the top-k)."""
    ls = torch.log_softmax(s[..., :v].float(), -1)
    lt = torch.log_softmax(t[..., :v].float(), -1)
    if ids is None:
        ids = s[..., :v].float().topk(k, -1).indices
    mask = torch.ones_like(ls, dtype=torch.bool).scatter_(-1, ids, False)
    s_tail = torch.logsumexp(ls.masked_fill(~mask, float("-inf")), -1, keepdim=True)
    t_tail = torch.logsumexp(lt.masked_fill(~mask, float("-inf")), -1, keepdim=True)
    s_lp = torch.cat([ls.gather(-1, ids), s_tail], -1)
    t_lp = torch.cat([lt.gather(-1, ids), t_tail], -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    return ids, s_lp, t_lp, -(t_lp.exp() * t_lp).sum(-1), kl


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_topk_matches_naive_and_grad_only_into_student(dtype, tol):
    s, t = _logits(9, dtype, seed=2), _logits(9, dtype, seed=3)
    k = 17
    g = torch.randn(9, k + 1)
    a = s.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    out = vocab_parallel_topk_logprobs(
        a, tt, k=k, chunk_size=4, true_vocab_size=V_TRUE, with_full_kl=True
    )
    (out.student_logprobs * g).sum().backward()
    b = s.clone().requires_grad_()
    top_vals = s.float()[:, :V_TRUE].topk(k, -1).values
    # Same top-k values (ids can differ only among tied bf16 logits), same descending order.
    assert torch.equal(s.float().gather(1, out.ids), top_vals)
    ids, s_lp, t_lp, t_ent, kl = naive_topk(b, t, k, ids=out.ids)
    (s_lp * g).sum().backward()
    if dtype == torch.float32:
        assert torch.equal(out.ids, s[:, :V_TRUE].topk(k, -1).indices)
    torch.testing.assert_close(out.student_logprobs, s_lp, atol=tol, rtol=tol)
    torch.testing.assert_close(out.teacher_logprobs, t_lp, atol=tol, rtol=tol)
    torch.testing.assert_close(out.teacher_entropy, t_ent, atol=tol, rtol=tol)
    torch.testing.assert_close(out.full_kl, kl, atol=tol, rtol=tol)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert tt.grad is None and not out.teacher_logprobs.requires_grad
    kl2 = vocab_parallel_kl(s, t, chunk_size=2, true_vocab_size=V_TRUE)
    torch.testing.assert_close(kl2, kl, atol=tol, rtol=tol)


def test_topk_tail_keeps_precision_when_topk_holds_almost_all_mass():
    s = torch.full((2, 64), -40.0)
    s[:, :4] = 10.0  # top-4 hold 1 - ~1e-21 of the mass: 1 - sum(top-k) is 0 in fp32
    out = vocab_parallel_topk_logprobs(s, s.clone(), k=4)
    expected = torch.log(torch.tensor(60.0)) - 50.0 - torch.log(torch.tensor(4.0))
    torch.testing.assert_close(out.student_logprobs[:, 4], expected.expand(2), atol=1e-4, rtol=0)
    assert torch.isfinite(out.teacher_entropy).all()


def test_logprobs_at_ids_inplace_backward_matches_copy():
    from rlrt_megatron.megatron.logprobs import vocab_parallel_logprobs_at_ids

    x = _logits(6).view(2, 3, V_PAD)
    ids = torch.stack([torch.randperm(V_TRUE)[:5] for _ in range(6)]).view(2, 3, 5)
    g = torch.randn(2, 3, 6)
    grads = []
    for inplace in (False, True):
        a = x.clone().requires_grad_()
        out = vocab_parallel_logprobs_at_ids(
            a * 1.0, ids, chunk_size=4, true_vocab_size=V_TRUE, inplace_backward=inplace
        )
        (out * g).sum().backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    _, s_lp, _, _, _ = naive_topk(x.view(6, V_PAD), x.view(6, V_PAD), 5, ids=ids.view(6, 5))
    torch.testing.assert_close(out.view(6, 6), s_lp, atol=1e-5, rtol=1e-5)
