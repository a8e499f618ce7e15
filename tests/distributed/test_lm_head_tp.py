"""LM-head log-probs from hidden states under real gloo TP groups vs the naive full vocabulary.

One spawn of 4 processes covers TP = 1, 2 and 4 (sub-groups {r}, {0,1},{2,3}, {0,1,2,3}). Each
rank holds the weight shard `[V/tp, H]` of the padded vocabulary and the replicated hidden states;
it returns its log-probs, entropy, at-ids log-probs (+ tail), top-k ids and the gradients of the
hidden states (the full gradient: summed over the group) and of its weight shard. The parent
compares them with `log_softmax(hidden @ W.T)` over the true vocabulary in fp32 (1e-5) and stitches
the weight-gradient shards back together.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

V_PAD, H, T, K = 1024, 16, 11, 7
# 1001: odd (not divisible by 2, 4 or 128), last shard partly padding; 700 at tp=4: rank 3's
# shard (768..1023) is entirely padding.
V_TRUES = (1001, 700)


def _inputs(v_true: int):
    g = torch.Generator().manual_seed(11 + v_true)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V_PAD, H, generator=g) * 0.5
    weight[v_true:] = hidden.mean(0) * 4  # padding rows would win every softmax / top-k
    tgt = torch.randint(0, v_true, (T,), generator=g)
    g_lp, g_h, g_k = (
        torch.randn(T, generator=g),
        torch.randn(T, generator=g),
        torch.randn(T, K + 1, generator=g),
    )
    return hidden, weight, tgt, g_lp, g_h, g_k


def _naive(hidden, weight, tgt, v_true, ids):
    lsm = torch.log_softmax((hidden @ weight.t())[:, :v_true], -1)
    lp = lsm.gather(-1, tgt[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    rest = torch.ones_like(lsm, dtype=torch.bool).scatter_(-1, ids, False)
    tail = torch.logsumexp(lsm.masked_fill(~rest, float("-inf")), -1, keepdim=True)
    return lp, ent, torch.cat([lsm.gather(-1, ids), tail], -1)


def _worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from rlrt_megatron.megatron.lm_head import (
        lm_head_logprobs,
        lm_head_logprobs_at_ids,
        lm_head_topk,
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
        for v_true in V_TRUES:
            hidden, weight, tgt, g_lp, g_h, g_k = _inputs(v_true)
            w_shard = weight[lo : lo + local]
            res = {}
            for impl in ("chunked", "naive"):
                a, b = hidden.clone().requires_grad_(), w_shard.clone().requires_grad_()
                lp, ent = lm_head_logprobs(
                    a, b, tgt, group=grp, with_entropy=True, true_vocab_size=v_true,
                    chunk_size=4, impl=impl,
                )  # fmt: skip
                (lp * g_lp + ent * g_h).sum().backward()
                ids = lm_head_topk(hidden, w_shard, K, group=grp, true_vocab_size=v_true,
                                   chunk_size=3, impl=impl)  # fmt: skip
                c, d = hidden.clone().requires_grad_(), w_shard.clone().requires_grad_()
                k_lp = lm_head_logprobs_at_ids(
                    c, d, ids, group=grp, true_vocab_size=v_true, chunk_size=5, impl=impl
                )
                (k_lp * g_k).sum().backward()
                res[impl] = dict(
                    lp=lp.detach(), ent=ent.detach(), gh=a.grad, gw=b.grad, ids=ids,
                    k_lp=k_lp.detach(), k_gh=c.grad, k_gw=d.grad,
                )  # fmt: skip
            out[(tp, v_true)] = res
    dist.destroy_process_group()
    return out


@pytest.mark.distributed
def test_lm_head_matches_naive_for_tp_1_2_4():
    results = run_distributed(_worker, 4)
    tol = dict(atol=1e-5, rtol=1e-5)
    for tp in (1, 2, 4):
        for v_true in V_TRUES:
            hidden, weight, tgt, g_lp, g_h, g_k = _inputs(v_true)
            members = results[:tp]  # ranks 0..tp-1 form one TP group
            ids = members[0][(tp, v_true)]["chunked"]["ids"]
            z = hidden @ weight.t()
            assert torch.equal(ids, z[:, :v_true].topk(K, -1).indices), (tp, v_true)
            a, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            lp, ent, _ = _naive(a, b, tgt, v_true, ids)
            (lp * g_lp + ent * g_h).sum().backward()
            c, d = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            k_lp = _naive(c, d, tgt, v_true, ids)[2]
            (k_lp * g_k).sum().backward()
            for impl in ("chunked", "naive"):
                got = [r[(tp, v_true)][impl] for r in members]
                where = f"tp={tp} v_true={v_true} impl={impl}"
                for r in got:
                    assert torch.equal(r["ids"], ids), where
                    torch.testing.assert_close(r["lp"], lp.detach(), **tol, msg=where)
                    torch.testing.assert_close(r["ent"], ent.detach(), **tol, msg=where)
                    torch.testing.assert_close(r["k_lp"], k_lp.detach(), **tol, msg=where)
                    assert torch.all(r["lp"] <= 0) and torch.all(r["k_lp"] <= 0)
                    # the replicated input gets the full gradient on every rank
                    torch.testing.assert_close(r["gh"], a.grad, **tol, msg=where)
                    torch.testing.assert_close(r["k_gh"], c.grad, **tol, msg=where)
                gw = torch.cat([r["gw"] for r in got])
                k_gw = torch.cat([r["k_gw"] for r in got])
                torch.testing.assert_close(gw, b.grad, **tol, msg=where)
                torch.testing.assert_close(k_gw, d.grad, **tol, msg=where)
                assert torch.all(gw[v_true:] == 0) and torch.all(k_gw[v_true:] == 0)
