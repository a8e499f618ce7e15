"""Vocab-parallel log-probs / entropy / top-k / KL under real gloo TP groups vs naive full vocab.

One spawn of 4 processes covers TP = 1, 2 and 4 (sub-groups {r}, {0,1},{2,3}, {0,1,2,3}); each
rank returns its shard's results and gradients, and the parent compares them with the naive
full-vocabulary computation (and stitches the gradient shards back together).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from unit.test_logprobs import naive_logprobs, naive_topk

V_PAD = 1024  # a multiple of 128 * tp for tp <= 4 (Megatron's padding rule)
# 1000: last shard partly padding; 700 at tp=4: rank 3's shard (768..1023) is entirely padding.
V_TRUES = (1000, 700)
T, K = 13, 11
CASES = [(dtype, v) for dtype in (torch.float32, torch.bfloat16) for v in V_TRUES]


def _inputs(dtype: torch.dtype, v_true: int):
    g = torch.Generator().manual_seed(7 + v_true)
    s = torch.randn(T, V_PAD, generator=g) * 3
    t = torch.randn(T, V_PAD, generator=g) * 3
    s[:, v_true:] = 60.0  # would dominate every softmax / top-k if padding leaked in
    t[:, v_true:] = 60.0
    tgt = torch.randint(0, v_true, (T,), generator=g)
    g_lp, g_h, g_topk = (
        torch.randn(T, generator=g),
        torch.randn(T, generator=g),
        torch.randn(T, K + 1, generator=g),
    )
    return s.to(dtype), t.to(dtype), tgt, g_lp, g_h, g_topk


def _worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from rlrt_megatron.megatron.logprobs import (
        vocab_parallel_kl,
        vocab_parallel_logprobs,
        vocab_parallel_topk_logprobs,
    )

    dist.init_process_group("gloo")
    groups = {}
    for tp in (1, 2, 4):
        for first in range(0, world_size, tp):
            ranks = list(range(first, first + tp))
            grp = dist.new_group(ranks)  # every rank must create every group, in order
            if rank in ranks:
                groups[tp] = grp
    out = {}
    for tp, grp in groups.items():
        local = V_PAD // tp
        lo = dist.get_rank(grp) * local
        for dtype, v_true in CASES:
            s, t, tgt, g_lp, g_h, g_topk = _inputs(dtype, v_true)
            a = s[:, lo : lo + local].clone().requires_grad_()
            lp, ent = vocab_parallel_logprobs(
                a, tgt, group=grp, chunk_size=5, with_entropy=True, true_vocab_size=v_true
            )
            (lp * g_lp + ent * g_h).sum().backward()
            b = s[:, lo : lo + local].clone().requires_grad_()
            res = vocab_parallel_topk_logprobs(
                b,
                t[:, lo : lo + local],
                k=K,
                group=grp,
                chunk_size=4,
                true_vocab_size=v_true,
                with_full_kl=True,
            )
            (res.student_logprobs * g_topk).sum().backward()
            kl = vocab_parallel_kl(
                s[:, lo : lo + local], t[:, lo : lo + local], group=grp, true_vocab_size=v_true
            )
            out[(tp, str(dtype), v_true)] = dict(
                lo=lo,
                lp=lp.detach(),
                ent=ent.detach(),
                grad=a.grad,
                topk=[x.detach() for x in res[:4]] + [res.full_kl],
                topk_grad=b.grad,
                kl=kl,
            )
    dist.destroy_process_group()
    return out


@pytest.mark.distributed
def test_vocab_parallel_matches_naive_for_tp_1_2_4():
    results = run_distributed(_worker, 4)
    for tp in (1, 2, 4):
        for dtype, v_true in CASES:
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            key = (tp, str(dtype), v_true)
            s, t, tgt, g_lp, g_h, g_topk = _inputs(dtype, v_true)
            a = s.clone().requires_grad_()
            lp_ref, ent_ref = naive_logprobs(a, tgt, v_true)
            (lp_ref * g_lp + ent_ref * g_h).sum().backward()
            members = [r for r in results[:tp]]  # ranks 0..tp-1 form one TP group
            for r in members:
                got = r[key]
                torch.testing.assert_close(got["lp"], lp_ref, atol=tol, rtol=tol)
                torch.testing.assert_close(got["ent"], ent_ref, atol=tol, rtol=tol)
            grad = torch.cat([r[key]["grad"] for r in members], dim=1)
            assert grad.dtype == dtype and torch.all(grad[:, v_true:] == 0)
            torch.testing.assert_close(grad.float(), a.grad.float(), atol=tol, rtol=tol)

            ids = members[0][key]["topk"][0]
            top_vals = s.float()[:, :v_true].topk(K, -1).values
            assert torch.equal(s.float().gather(1, ids), top_vals)
            if dtype == torch.float32:
                assert torch.equal(ids, s[:, :v_true].topk(K, -1).indices)
            b = s.clone().requires_grad_()
            ref = naive_topk(b, t, K, v_true, ids=ids)
            (ref[1] * g_topk).sum().backward()
            for r in members:
                got = r[key]["topk"]
                assert torch.equal(got[0], ids)
                for x, y in zip(got[1:], ref[1:], strict=True):
                    torch.testing.assert_close(x, y, atol=tol, rtol=tol)
                torch.testing.assert_close(r[key]["kl"], ref[4], atol=tol, rtol=tol)
            tgrad = torch.cat([r[key]["topk_grad"] for r in members], dim=1)
            torch.testing.assert_close(tgrad.float(), b.grad.float(), atol=tol, rtol=tol)
