"""The LM head fused with the log-probs, part 2: log-probs at given ids plus a tail bucket and the
top-k ids from hidden states (SDPO/SRPO's views), vocab-parallel, never holding `[tokens, vocab]`
logits. Same semantics as `vocab_parallel_logprobs_at_ids` / `vocab_parallel_topk_ids` of
`logprobs.py`:

    out[..., i] = z_{id_i} - lse  (i < K),
    out[..., K] = log sum_{j not in ids} exp(z_j) - lse  (tail sum-exp floored at fp32 tiny).

Torch block ops on every device (SDPO/SRPO's path, not the hot RL path); the blocking and the
shard bookkeeping are `lm_head.py`'s.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlrt_megatron.megatron.lm_head import (
    LogprobsImpl,
    _block_shape,
    _check_inputs,
    _local_index,
    _naive_logits,
    _scaled,
    _shard,
    _vocab_blocks,
    inverse_temperature,
    resolve_impl,
)
from rlrt_megatron.megatron.tp_reduce import TINY, all_reduce

__all__ = ["lm_head_logprobs_at_ids", "lm_head_topk"]


def _hits(here: torch.Tensor, jc: torch.Tensor, width: int) -> torch.Tensor:
    """`[rows, width]` bool, True at `jc[r, i]` where `here[r, i]`: scattered, so no boolean-mask
    indexing (a `nonzero`, i.e. a host sync per vocab block on a GPU). Ids outside the block all
    land in one extra column (dropped), each written with the same value: deterministic."""
    hit = torch.zeros(jc.shape[0], width + 1, dtype=torch.bool, device=jc.device)
    hit.scatter_(1, torch.where(here, jc, width), True)
    return hit[:, :width]


def _at_ids_forward(hidden, weight, ids, shard, group, size, chunk, scale=1.0):
    n, k = ids.shape
    dev = hidden.device
    mb, vb = _block_shape(dev, "fwd", chunk)
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    s_rest = torch.zeros(n, dtype=torch.float32, device=dev)
    z_ids = torch.zeros(n, k, dtype=torch.float32, device=dev)
    loc = _local_index(ids, shard)
    for t0 in range(0, n, mb):
        t1 = min(n, t0 + mb)
        h = hidden[t0:t1]
        for v0, v1 in _vocab_blocks(shard, vb):
            zf = _scaled(h @ weight[v0:v1].t(), scale)
            mm, ss, sr = m[t0:t1], s[t0:t1], s_rest[t0:t1]
            new_m = torch.maximum(mm, zf.amax(-1))
            alpha = torch.where(ss > 0, (mm - new_m).exp(), torch.zeros_like(ss))
            e = (zf - new_m[:, None]).exp_()
            ss.mul_(alpha).add_(e.sum(-1))
            j = loc[t0:t1] - v0
            here = (j >= 0) & (j < zf.shape[1])
            jc = j.clamp(0, zf.shape[1] - 1)
            # tail summed directly (not 1 - sum top-k): full relative precision
            e.masked_fill_(_hits(here, jc, zf.shape[1]), 0.0)
            sr.mul_(torch.where(sr > 0, (mm - new_m).exp(), torch.zeros_like(sr))).add_(e.sum(-1))
            mm.copy_(new_m)
            z_ids[t0:t1] = torch.where(here, zf.gather(1, jc), z_ids[t0:t1])
    if size > 1:
        gm = m.clone()
        all_reduce(gm, dist.ReduceOp.MAX, group, size)
        scale = torch.where(s > 0, (m - gm).exp(), torch.zeros_like(s))
        st = torch.cat([(scale * s)[:, None], (scale * s_rest)[:, None], z_ids], dim=1)
        all_reduce(st, dist.ReduceOp.SUM, group, size)
        m, s, s_rest, z_ids = gm, st[:, 0], st[:, 1], st[:, 2:]
    lse = m + s.log()
    lse_rest = m + s_rest.clamp_min(TINY).log()
    out = torch.empty(n, k + 1, dtype=torch.float32, device=dev)
    out[:, :k] = ((z_ids - m[:, None]) - s.log()[:, None]).clamp_(max=0.0)
    out[:, k] = (lse_rest - lse).clamp_(max=0.0)
    return out, lse, lse_rest


class _LMHeadAtIds(torch.autograd.Function):
    """grad_j = sum_i g_i [j = id_i] + g_K [j not in K] exp(z_j - lse_rest) - p_j sum_i g_i."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, shard, group, size, chunk, scale=1.0):
        out, lse, lse_rest = _at_ids_forward(hidden, weight, ids, shard, group, size, chunk, scale)
        ctx.save_for_backward(hidden, weight, ids, lse, lse_rest)
        ctx.meta = (shard, group, size, chunk, scale)
        return out

    @staticmethod
    def backward(ctx, g_out):
        hidden, weight, ids, lse, lse_rest = ctx.saved_tensors
        shard, group, size, chunk, scale = ctx.meta
        n, k = ids.shape
        dev = hidden.device
        mb, vb = _block_shape(dev, "bwd", chunk)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        loc = _local_index(ids, shard)
        g = g_out.float()
        g_sum = g.sum(-1, keepdim=True)
        for t0 in range(0, n, mb):
            t1 = min(n, t0 + mb)
            h = hidden[t0:t1]
            acc = torch.zeros(t1 - t0, hidden.shape[1], dtype=torch.float32, device=dev)
            for v0, v1 in _vocab_blocks(shard, vb):
                w = weight[v0:v1]
                zf = _scaled(h @ w.t(), scale)
                j = loc[t0:t1] - v0
                here = (j >= 0) & (j < zf.shape[1])
                jc = j.clamp(0, zf.shape[1] - 1)
                tail = (zf - lse_rest[t0:t1, None]).exp().mul_(g[t0:t1, k : k + 1])
                tail.masked_fill_(_hits(here, jc, zf.shape[1]), 0.0)  # j in K: no tail term
                tail.sub_((zf - lse[t0:t1, None]).exp_().mul_(g_sum[t0:t1]))
                tail.scatter_add_(1, jc, g[t0:t1, :k] * here)
                if scale != 1.0:
                    tail.mul_(scale)  # chain rule through z -> scale * z
                gz = tail.to(hidden.dtype)
                if need_h:
                    acc.add_((gz @ w).float())
                if need_w:
                    grad_w[v0:v1].addmm_(gz.t(), h)
            if need_h:
                all_reduce(acc, dist.ReduceOp.SUM, group, size)
                grad_h[t0:t1] = acc
        return grad_h, grad_w, None, None, None, None, None, None


def lm_head_logprobs_at_ids(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    true_vocab_size: int | None = None,
    chunk_size: int | None = None,
    impl: LogprobsImpl = "auto",
    temperature: float = 1.0,
    check_ids: bool = True,
) -> torch.Tensor:
    """Log-probs at `ids` `[..., K]` plus the tail bucket, `[..., K+1]` fp32, from hidden states.

    out[..., i] = z_{id_i} - lse (i < K); out[..., K] = log sum_{j not in ids} exp(z_j) - lse,
    z = hidden @ W.T / temperature. Same semantics as `vocab_parallel_logprobs_at_ids` (ids
    distinct per row); arguments as :func:`lm_head_logprobs`. Differentiable w.r.t. `hidden`
    and `weight`.
    """
    if hidden.shape[:-1] != ids.shape[:-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and ids {tuple(ids.shape)} disagree: expected "
            "hidden [..., H] and ids [..., K] with the same leading dimensions"
        )
    lead, k = ids.shape[:-1], ids.shape[-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1, k).long()
    shard, size = _shard(weight.shape[0], group, true_vocab_size)
    _check_inputs(flat_h, weight, flat_ids, true_vocab_size, size, "ids", check_ids)
    scale = inverse_temperature(temperature)
    if resolve_impl(impl, flat_h.device) == "naive":
        z = _naive_logits(flat_h, weight, group, size, true_vocab_size, temperature)
        lsm = torch.log_softmax(z, -1)
        rest = torch.ones_like(lsm, dtype=torch.bool).scatter_(-1, flat_ids, False)
        tail = torch.logsumexp(lsm.masked_fill(~rest, float("-inf")), -1, keepdim=True)
        return torch.cat([lsm.gather(-1, flat_ids), tail], -1).view(*lead, k + 1)
    flat_h = flat_h.contiguous()
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    if torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad):
        out = _LMHeadAtIds.apply(flat_h, weight_c, flat_ids, shard, group, size, chunk_size, scale)
    else:
        with torch.no_grad():
            out = _at_ids_forward(
                flat_h, weight_c, flat_ids, shard, group, size, chunk_size, scale
            )[0]
    return out.view(*lead, k + 1)


# ----------------------------------------------------------------------------------------------
# Part 3: top-k ids (SDPO/SRPO support), as `vocab_parallel_topk_ids`: local top-k per shard
# (running top-k over vocab blocks), all-gather k * tp candidates, top-k of those. No grad.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def lm_head_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    group: dist.ProcessGroup | None = None,
    true_vocab_size: int | None = None,
    chunk_size: int | None = None,
    impl: LogprobsImpl = "auto",
) -> torch.Tensor:
    """Global top-k token ids `[..., k]` (descending logit) of `hidden @ weight.T`; no grad.
    (No temperature: dividing the logits by T > 0 keeps their order, so the ids are the same.)"""
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    shard, size = _shard(weight.shape[0], group, true_vocab_size)
    vocab = true_vocab_size if true_vocab_size is not None else weight.shape[0] * size
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    n, dev = flat_h.shape[0], flat_h.device
    if resolve_impl(impl, dev) == "naive":
        z = _naive_logits(flat_h, weight, group, size, true_vocab_size)
        return z.topk(k, -1).indices.view(*lead, k)
    mb, vb = _block_shape(dev, "fwd", chunk_size)
    vals = torch.full((n, k), float("-inf"), dtype=torch.float32, device=dev)
    out = torch.zeros((n, k), dtype=torch.int64, device=dev)
    for t0 in range(0, n, mb):
        t1 = min(n, t0 + mb)
        h = flat_h[t0:t1]
        for v0, v1 in _vocab_blocks(shard, vb):
            zf = (h @ weight[v0:v1].t()).float()
            kk = min(k, v1 - v0)
            bv, bi = zf.topk(kk, dim=-1)
            cv = torch.cat([vals[t0:t1], bv], 1)
            ci = torch.cat([out[t0:t1], bi + (shard.start + v0)], 1)
            best = cv.topk(k, dim=-1).indices
            vals[t0:t1] = cv.gather(1, best)
            out[t0:t1] = ci.gather(1, best)
    if size > 1:
        all_vals = [torch.empty_like(vals) for _ in range(size)]
        all_ids = [torch.empty_like(out) for _ in range(size)]
        dist.all_gather(all_vals, vals, group=group)
        dist.all_gather(all_ids, out, group=group)
        vals, cand = torch.cat(all_vals, dim=1), torch.cat(all_ids, dim=1)
        out = cand.gather(1, vals.topk(k, dim=-1).indices)
    return out.view(*lead, k)
