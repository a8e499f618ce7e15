"""Vocab-parallel token log-probs, entropy, top-k log-probs and KL, chunked and memory-bounded.

Every function takes the *local vocabulary shard* of the logits, `[..., V/tp]` (what Megatron's
column-parallel LM head produces with `parallel_output=True`), plus the tensor-parallel group, and
returns exactly what the full-vocabulary computation would give:

    lse_t     = log sum_j exp(z_tj)                     (j over the true vocabulary, all shards)
    logp_t    = z_t,y_t - lse_t                         (log-prob of the target token y_t)
    H_t       = lse_t - sum_j p_tj z_tj                 (entropy, p = softmax(z))

Memory rules (the reason this module exists): the vocabulary is never all-gathered and no
`[T, V]` float32 tensor is ever built. Rows are processed in chunks of `chunk_size` tokens; a chunk
costs a few `[chunk, V/tp]` fp32 temporaries. Across TP ranks only `[chunk]`-sized statistics
(max, sum-exp, the target logit) and `[chunk, k]` top-k candidates travel. Backward saves the
logits shard (a reference to the tensor the LM head produced, not a copy) plus `[T]` statistics
and recomputes the softmax chunk by chunk; no communication is needed in backward because the
saved global `lse` and `H` make every shard's gradient local:

    d logp_t / d z_tj = [j = y_t] - p_tj
    d H_t    / d z_tj = -p_tj (log p_tj + H_t)

With `inplace_backward=True` the gradient is written into the logits' own storage (what Megatron's
fused cross entropy does), so fwd+bwd costs no extra `[T, V/tp]` buffer. Autograd's version
counter makes any other user of the same logits tensor fail loudly instead of silently reading a
gradient.

From hidden states instead of logits (the LM head fused with all of the above, no `[T, V/tp]`
logits at all): `lm_head_logprobs`, `lm_head_logprobs_at_ids`, `lm_head_topk`, defined in
:mod:`rlrt_megatron.megatron.lm_head` and re-exported here. Those take the sampler's
`temperature` (softmax(z / T), what the rollout engine reports); the functions here take logits
as given: divide them by T first to compare with an engine sampling at T.

Padded vocabulary entries (Megatron pads V to a multiple of 128 * tp; ids >= `true_vocab_size`)
are excluded everywhere: they never enter the max, the sum-exp, top-k, or the gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from rlrt_megatron.megatron.lm_head import lm_head_logprobs
from rlrt_megatron.megatron.lm_head_ids import lm_head_logprobs_at_ids, lm_head_topk
from rlrt_megatron.megatron.tp_reduce import TINY, all_reduce, group_rank_size

__all__ = [
    "TopKLogprobs",
    "lm_head_logprobs",  # re-exported: the LM head fused with the log-probs (lm_head.py)
    "lm_head_logprobs_at_ids",
    "lm_head_topk",
    "vocab_parallel_kl",
    "support_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_logprobs_at_ids",
    "vocab_parallel_topk_ids",
    "vocab_parallel_topk_logprobs",
]


# Bytes of one fp32 chunk temporary when `chunk_size` is not given. On CPU the chunk should stay in
# a core's L2 (2 MiB here): measured at V = 151,936, 1-4 rows per chunk run 2x faster than 16+ rows
# (and faster than the naive fused log_softmax, which streams [T, V] fp32 through DRAM twice). On
# GPU a chunk must be large enough to saturate the device and amortise launches/collectives, while
# staying small against the [T, V/tp] logits.
_CHUNK_BYTES = {"cpu": 2 * 2**20, "cuda": 256 * 2**20}


# ----------------------------------------------------------------------------------------------
# Small helpers: group info, collectives that are no-ops on a single rank, vocab bookkeeping.
# ----------------------------------------------------------------------------------------------


class _Shard(NamedTuple):
    """Where the local shard sits in the global vocabulary and how much of it is real."""

    start: int  # global id of local column 0
    n_valid: int  # local columns [0, n_valid) are real tokens; the rest are vocab padding


def _shard(
    local_vocab: int,
    group: dist.ProcessGroup | None,
    vocab_start: int | None,
    true_vocab_size: int | None,
) -> tuple[_Shard, int]:
    rank, size = group_rank_size(group)
    start = rank * local_vocab if vocab_start is None else int(vocab_start)
    end = start + local_vocab
    if true_vocab_size is not None:
        end = min(end, int(true_vocab_size))
    return _Shard(start, max(0, end - start)), size


def _chunk_rows(n_rows: int, local_vocab: int, chunk_size: int | None, dev: torch.device) -> int:
    if chunk_size is None:
        budget = _CHUNK_BYTES.get(dev.type, _CHUNK_BYTES["cuda"])
        chunk_size = max(1, budget // (4 * max(1, local_vocab)))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return max(1, min(chunk_size, max(1, n_rows)))


def _flatten(logits: torch.Tensor, target: torch.Tensor | None = None):
    if target is not None and logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: expected "
            "logits [..., V/tp] and target [...] with the same leading dimensions"
        )
    return logits.reshape(-1, logits.shape[-1])


def _check_targets(target: torch.Tensor, true_vocab_size: int | None, global_vocab: int) -> None:
    # Only on CPU: on GPU the check would force a host sync per call.
    if target.device.type != "cpu" or target.numel() == 0:
        return
    limit = global_vocab if true_vocab_size is None else int(true_vocab_size)
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= limit:
        raise ValueError(
            f"target ids must lie in [0, {limit}) (the true vocabulary), got min {lo} max {hi}; "
            "mask padding positions with a valid id (e.g. 0) and drop them afterwards"
        )


def _local_valid_fp32(x: torch.Tensor, shard: _Shard) -> torch.Tensor:
    """The chunk's real (non-padding) columns in fp32. May alias `x` when it already is fp32."""
    return x[:, : shard.n_valid].float()


def _local_target_index(target: torch.Tensor, shard: _Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column of each target clamped into range, whether this shard owns the target)."""
    idx = target - shard.start
    own = (idx >= 0) & (idx < shard.n_valid)
    return idx.clamp(0, max(shard.n_valid - 1, 0)), own


def _zero_owned(x: torch.Tensor, idx: torch.Tensor, own: torch.Tensor) -> None:
    """x[r, idx[r, i]] = 0 where own[r, i]. (A plain scatter would race: non-owned ids are clamped
    onto real columns, possibly the same column as an owned id.)"""
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
    x[rows[own], idx[own]] = 0.0


# ----------------------------------------------------------------------------------------------
# Part 1: per-token log-prob of the target (+ entropy).
# ----------------------------------------------------------------------------------------------
def _logprob_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    shard: _Shard,
    group,
    size: int,
    rows: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked forward: returns fp32 (logp [T], entropy [T] (zeros if not asked), lse [T])."""
    n = logits.shape[0]
    dev = logits.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        c = b - a
        if shard.n_valid > 0:
            z = _local_valid_fp32(logits[a:b], shard)
            m = z.amax(dim=-1)
        else:  # the whole local shard is vocabulary padding
            z = None
            m = torch.full((c,), float("-inf"), dtype=torch.float32, device=dev)
        # Global max first so every shard exponentiates against the same shift: exp(z - m) <= 1.
        all_reduce(m, dist.ReduceOp.MAX, group, size)
        stats = torch.zeros(3, c, dtype=torch.float32, device=dev)  # sum-exp, sum e*z', z_target
        if z is not None:
            zs = z - m[:, None]  # z' = z - m, one [c, V/tp] temporary
            if with_entropy:
                e = zs.exp()
                stats[0] = e.sum(-1)
                # sum_j e_j z'_j with no third temporary: a batched dot product.
                stats[1] = torch.bmm(e.unsqueeze(1), zs.unsqueeze(2)).view(c)
                del e
            else:
                stats[0] = zs.exp_().sum(-1)
            del zs
            idx, own = _local_target_index(target[a:b], shard)
            stats[2] = z.gather(1, idx[:, None]).squeeze(1) * own
        del z
        all_reduce(stats, dist.ReduceOp.SUM, group, size)
        log_s = stats[0].log()
        lse[a:b] = m + log_s
        logp[a:b] = stats[2] - lse[a:b]
        if with_entropy:
            # H = lse - E_p[z] = (m + log s) - (m + sum e z' / s) = log s - sum e z' / s
            ent[a:b] = log_s - stats[1] / stats[0]
    return logp, ent, lse


class _VocabParallelLogprobs(torch.autograd.Function):
    """Differentiable log-probs (+ entropy) from a vocab shard; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, target, shard, group, size, rows, with_entropy, inplace_backward):
        logp, ent, lse = _logprob_forward(logits, target, shard, group, size, rows, with_entropy)
        ctx.save_for_backward(logits, target, lse, ent)
        ctx.meta = (shard, rows, with_entropy, inplace_backward)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, target, lse, ent = ctx.saved_tensors
        shard, rows, with_entropy, inplace = ctx.meta
        if inplace:
            grad = logits  # the logits are dead after this backward: reuse their storage
        else:
            grad = torch.empty_like(logits)
        grad[:, shard.n_valid :] = 0  # padded vocabulary columns get no gradient
        n = logits.shape[0]
        for a in range(0, n, rows):
            b = min(n, a + rows)
            if shard.n_valid == 0:
                continue
            z = _local_valid_fp32(logits[a:b], shard)
            gl = g_logp[a:b].float()
            # p_j = exp(z_j - lse): the softmax recomputed for this chunk only.
            p = (z - lse[a:b, None]).exp_()
            if with_entropy:
                # g_logp * ([j=y] - p_j) + g_H * (-p_j (log p_j + H)), log p_j = z_j - lse
                coef = z - (lse[a:b] - ent[a:b])[:, None]
                coef.mul_(-g_ent[a:b].float()[:, None]).sub_(gl[:, None])
                p.mul_(coef)
                del coef
            else:
                p.mul_(-gl[:, None])
            idx, own = _local_target_index(target[a:b], shard)
            p.scatter_add_(1, idx[:, None], (gl * own)[:, None])
            del z  # may alias logits[a:b] (fp32 input): p is computed, safe to overwrite now
            grad[a:b, : shard.n_valid] = p
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    vocab_start: int | None = None,
    true_vocab_size: int | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `target` under softmax(logits) over a TP-sharded vocabulary (+ entropy).

    logp_t = z_t,y_t - log sum_j exp(z_tj),  H_t = log sum_j exp(z_tj) - sum_j p_tj z_tj,
    with j over the *true* vocabulary on all ranks of `group`.

    Args:
        logits: `[..., V/tp]` local vocabulary shard, any float dtype (bf16 stays bf16 in memory;
            each chunk is upcast to fp32).
        target: `[...]` global token ids in [0, true_vocab_size).
        group: the tensor-parallel group; None means the logits hold the whole vocabulary.
        chunk_size: tokens per chunk; default: a chunk's fp32 copy is ~2 MiB (CPU) / 256 MiB (GPU).
        with_entropy: also return the (differentiable) entropy.
        vocab_start: global id of local column 0; default `rank_in_group * V/tp` (Megatron's
            contiguous vocab partition).
        true_vocab_size: ids >= this are vocabulary padding and are excluded; default: none.
        inplace_backward: write the gradient into the logits' storage (saves one [T, V/tp]
            buffer). Only for logits used by nothing else (e.g. fresh from the LM head).

    Returns:
        fp32 log-probs shaped like `target`, and fp32 entropy of the same shape if asked.
    """
    shape = target.shape
    flat = _flatten(logits, target)
    tgt = target.reshape(-1).long()
    shard, size = _shard(flat.shape[-1], group, vocab_start, true_vocab_size)
    _check_targets(tgt, true_vocab_size, flat.shape[-1] * size)
    rows = _chunk_rows(flat.shape[0], flat.shape[-1], chunk_size, flat.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        if inplace_backward and not flat.is_contiguous():
            raise ValueError("inplace_backward needs contiguous logits")
        logp, ent = _VocabParallelLogprobs.apply(
            flat, tgt, shard, group, size, rows, with_entropy, inplace_backward
        )
    else:
        with torch.no_grad():
            logp, ent, _ = _logprob_forward(flat, tgt, shard, group, size, rows, with_entropy)
    if with_entropy:
        return logp.view(shape), ent.view(shape)
    return logp.view(shape)


# ----------------------------------------------------------------------------------------------
# Part 2: student top-k (+ tail bucket) log-probs for SDPO/SRPO, teacher at the same ids, full KL.
#
# Three primitives, because the trainer never holds student and teacher logits at the same time
# (they come from two forwards): `vocab_parallel_topk_ids` picks the support from the student,
# `vocab_parallel_logprobs_at_ids` evaluates any model on a given support (differentiable), and
# `vocab_parallel_topk_logprobs` composes them when both logits are at hand.
# ----------------------------------------------------------------------------------------------
class TopKLogprobs(NamedTuple):
    """Student top-k support with a tail bucket; `[..., K+1]` tensors end with the tail entry.

    ids: `[..., K]` global token ids of the student's top-k (descending student logit).
    student_logprobs: `[..., K+1]` log pi_S at ids, then log(1 - sum_k pi_S(id_k)); grad flows.
    teacher_logprobs: `[..., K+1]` log pi_T at the same ids and tail bucket; no grad.
    teacher_entropy: `[...]` -sum_i q_i log q_i over the K+1 support (q = exp(teacher_logprobs)).
    full_kl: `[...]` KL(pi_S || pi_T) over the full vocabulary if asked, else None; no grad.
    """

    ids: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_entropy: torch.Tensor
    full_kl: torch.Tensor | None


def _global_topk_ids(
    z: torch.Tensor | None, k: int, shard: _Shard, group, size: int, c: int, dev
) -> torch.Tensor:
    """Global top-k ids of a chunk: local top-k per shard, all-gather k*tp candidates, top-k."""
    vals = torch.full((c, k), float("-inf"), dtype=torch.float32, device=dev)
    ids = torch.zeros((c, k), dtype=torch.int64, device=dev)
    if z is not None:
        kk = min(k, shard.n_valid)
        v, i = z.topk(kk, dim=-1)
        vals[:, :kk] = v
        ids[:, :kk] = i + shard.start
    if size > 1:
        all_vals = [torch.empty_like(vals) for _ in range(size)]
        all_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(all_vals, vals, group=group)
        dist.all_gather(all_ids, ids, group=group)
        vals, ids = torch.cat(all_vals, dim=1), torch.cat(all_ids, dim=1)
    best = vals.topk(k, dim=-1).indices
    return ids.gather(1, best)


def vocab_parallel_topk_ids(
    logits: torch.Tensor,
    k: int,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_start: int | None = None,
    true_vocab_size: int | None = None,
) -> torch.Tensor:
    """Global top-k token ids `[..., k]` (descending logit) of TP-sharded logits; no grad.

    Each shard takes its local top-k over real (non-padding) columns; the k * tp candidates are
    all-gathered and the top-k of those is the global top-k (any global top-k id is in its own
    shard's local top-k).
    """
    lead = logits.shape[:-1]
    flat = _flatten(logits)
    shard, size = _shard(flat.shape[-1], group, vocab_start, true_vocab_size)
    vocab = true_vocab_size if true_vocab_size is not None else flat.shape[-1] * size
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
    rows = _chunk_rows(flat.shape[0], flat.shape[-1], chunk_size, flat.device)
    n, dev = flat.shape[0], flat.device
    out = torch.empty(n, k, dtype=torch.int64, device=dev)
    with torch.no_grad():
        for a in range(0, n, rows):
            b = min(n, a + rows)
            z = _local_valid_fp32(flat[a:b], shard) if shard.n_valid > 0 else None
            out[a:b] = _global_topk_ids(z, k, shard, group, size, b - a, dev)
    return out.view(*lead, k)


def _at_ids_forward(
    logits: torch.Tensor, ids: torch.Tensor, shard: _Shard, group, size: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked: (log-probs at ids + tail [T, K+1], lse [T], lse over the tail ids [T])."""
    n, k = ids.shape
    dev = logits.device
    out = torch.empty(n, k + 1, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    lse_rest = torch.empty(n, dtype=torch.float32, device=dev)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        c = b - a
        if shard.n_valid > 0:
            z = _local_valid_fp32(logits[a:b], shard)
            m = z.amax(-1)
        else:
            z = None
            m = torch.full((c,), float("-inf"), dtype=torch.float32, device=dev)
        all_reduce(m, dist.ReduceOp.MAX, group, size)
        # [sum-exp (1), logits at ids (k), sum-exp over the rest (1)] in one SUM all-reduce.
        stats = torch.zeros(c, k + 2, dtype=torch.float32, device=dev)
        if z is not None:
            e = (z - m[:, None]).exp_()
            stats[:, 0] = e.sum(-1)
            idx, own = _local_target_index(ids[a:b], shard)
            stats[:, 1 : k + 1] = z.gather(1, idx) * own
            # The tail is summed directly (not as 1 - sum top-k): it keeps full relative
            # precision when the top-k hold almost all of the mass.
            _zero_owned(e, idx, own)
            stats[:, k + 1] = e.sum(-1)
            del e
        del z
        all_reduce(stats, dist.ReduceOp.SUM, group, size)
        lse[a:b] = m + stats[:, 0].log()
        lse_rest[a:b] = m + stats[:, k + 1].clamp_min(TINY).log()
        out[a:b, :k] = stats[:, 1 : k + 1] - lse[a:b, None]
        out[a:b, k] = lse_rest[a:b] - lse[a:b]
    return out, lse, lse_rest


class _VocabParallelAtIds(torch.autograd.Function):
    """Log-probs at given ids + tail bucket, differentiable.

    For l_i = z_{id_i} - lse (i < K) and l_K = log sum_{j not in K} exp(z_j) - lse:
        d l_i / d z_j = [j = id_i] - p_j,     d l_K / d z_j = [j not in K] exp(z_j - lse_rest) - p_j
    so with upstream g: grad_j = sum_i g_i [j = id_i] + g_K [j not in K] exp(z_j - lse_rest)
                                 - p_j sum_i g_i.   (Local per shard: no backward communication.)
    """

    @staticmethod
    def forward(ctx, logits, ids, shard, group, size, rows, inplace_backward):
        out, lse, lse_rest = _at_ids_forward(logits, ids, shard, group, size, rows)
        ctx.save_for_backward(logits, ids, lse, lse_rest)
        ctx.meta = (shard, rows, inplace_backward)
        return out

    @staticmethod
    def backward(ctx, g_lp):
        logits, ids, lse, lse_rest = ctx.saved_tensors
        shard, rows, inplace = ctx.meta
        k = ids.shape[1]
        grad = logits if inplace else torch.empty_like(logits)
        grad[:, shard.n_valid :] = 0
        n = logits.shape[0]
        for a in range(0, n if shard.n_valid > 0 else 0, rows):
            b = min(n, a + rows)
            z = _local_valid_fp32(logits[a:b], shard)
            g = g_lp[a:b].float()
            p = (z - lse[a:b, None]).exp_()
            tail = (z - lse_rest[a:b, None]).exp_().mul_(g[:, k : k + 1])
            idx, own = _local_target_index(ids[a:b], shard)
            _zero_owned(tail, idx, own)  # j in K gets no tail-bucket term
            tail.sub_(p.mul_(g.sum(-1, keepdim=True)))
            del p, z
            tail.scatter_add_(1, idx, g[:, :k] * own)
            grad[a:b, : shard.n_valid] = tail
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs_at_ids(
    logits: torch.Tensor,
    ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_start: int | None = None,
    true_vocab_size: int | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Log-probs at `ids` `[..., K]` plus the tail bucket: `[..., K+1]` fp32, differentiable.

    out[..., i] = z_{id_i} - lse for i < K;  out[..., K] = log sum_{j not in ids} exp(z_j) - lse
    (= log(1 - sum_i p_{id_i}) without cancellation; the tail's sum-exp is floored at float32
    tiny so the entry is never -inf).
    `ids` must be distinct per row (as top-k ids are). Arguments as `vocab_parallel_logprobs`.
    """
    if logits.shape[:-1] != ids.shape[:-1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree: expected "
            "logits [..., V/tp] and ids [..., K] with the same leading dimensions"
        )
    lead, k = ids.shape[:-1], ids.shape[-1]
    flat = _flatten(logits)
    flat_ids = ids.reshape(-1, k).long()
    shard, size = _shard(flat.shape[-1], group, vocab_start, true_vocab_size)
    _check_targets(flat_ids, true_vocab_size, flat.shape[-1] * size)
    rows = _chunk_rows(flat.shape[0], flat.shape[-1], chunk_size, flat.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        if inplace_backward and not flat.is_contiguous():
            raise ValueError("inplace_backward needs contiguous logits")
        out = _VocabParallelAtIds.apply(flat, flat_ids, shard, group, size, rows, inplace_backward)
    else:
        with torch.no_grad():
            out = _at_ids_forward(flat, flat_ids, shard, group, size, rows)[0]
    return out.view(*lead, k + 1)


def support_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy over a `[..., K+1]` top-k + tail support: -sum_i q_i log q_i, q = exp(logprobs).

    Finite: the tail log-prob is floored (never -inf), so no 0 * -inf term appears.
    """
    return -(logprobs.exp() * logprobs).sum(-1)


def vocab_parallel_topk_logprobs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int = 100,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_start: int | None = None,
    true_vocab_size: int | None = None,
    with_full_kl: bool = False,
) -> TopKLogprobs:
    """Student top-k log-probs with a tail bucket and the teacher's log-probs on that support.

    K = the student's global top-k ids (local top-k per shard, then top-k of the k * tp candidates),
    student_logprobs[..., i] = log pi_S(id_i),
    student_logprobs[..., K] = log sum_{j not in K} pi_S(j)
    (= log(1 - sum_i pi_S(id_i)), computed without cancellation), the same for the teacher, and
    teacher_entropy = -sum_{i <= K} q_i log q_i over these K+1 buckets. Gradients flow only into
    `student_logits`. Both logits are `[..., V/tp]` shards with the same vocabulary partition and
    the same leading shape (the aligned response positions). `full_kl` (if asked) is
    KL(pi_S || pi_T) = sum_j p_S,j (log p_S,j - log p_T,j) over the whole true vocabulary.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (aligned response positions)"
        )
    if true_vocab_size is not None and k > true_vocab_size:
        raise ValueError(f"k={k} exceeds the vocabulary size {true_vocab_size}")
    kw = dict(group=group, chunk_size=chunk_size, vocab_start=vocab_start)
    kw["true_vocab_size"] = true_vocab_size
    ids = vocab_parallel_topk_ids(student_logits.detach(), k, **kw)
    s_lp = vocab_parallel_logprobs_at_ids(student_logits, ids, **kw)
    with torch.no_grad():
        t_lp = vocab_parallel_logprobs_at_ids(teacher_logits.detach(), ids, **kw)
    kl = None
    if with_full_kl:
        kl = vocab_parallel_kl(student_logits.detach(), teacher_logits.detach(), **kw)
    return TopKLogprobs(ids, s_lp, t_lp, support_entropy(t_lp), kl)


def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_start: int | None = None,
    true_vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token KL(pi_S || pi_T) = sum_j p_S,j (z_S,j - z_T,j) - lse_S + lse_T, for analysis.

    Full true vocabulary across the TP group, chunked, no grad; returns fp32 `[...]`.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    lead = student_logits.shape[:-1]
    s_flat, t_flat = _flatten(student_logits), _flatten(teacher_logits)
    shard, size = _shard(s_flat.shape[-1], group, vocab_start, true_vocab_size)
    rows = _chunk_rows(s_flat.shape[0], s_flat.shape[-1], chunk_size, s_flat.device)
    n, dev = s_flat.shape[0], s_flat.device
    out = torch.empty(n, dtype=torch.float32, device=dev)
    with torch.no_grad():
        for a in range(0, n, rows):
            b = min(n, a + rows)
            c = b - a
            if shard.n_valid > 0:
                zs = _local_valid_fp32(s_flat[a:b], shard)
                zt = _local_valid_fp32(t_flat[a:b], shard)
                m = torch.stack([zs.amax(-1), zt.amax(-1)])
            else:
                zs = zt = None
                m = torch.full((2, c), float("-inf"), dtype=torch.float32, device=dev)
            all_reduce(m, dist.ReduceOp.MAX, group, size)
            stats = torch.zeros(3, c, dtype=torch.float32, device=dev)
            if zs is not None:
                es = (zs - m[0][:, None]).exp_()
                stats[0] = es.sum(-1)
                stats[1] = (zt - m[1][:, None]).exp_().sum(-1)
                stats[2] = torch.bmm(es.unsqueeze(1), (zs - zt).unsqueeze(2)).view(c)
            all_reduce(stats, dist.ReduceOp.SUM, group, size)
            lse_s = m[0] + stats[0].log()
            lse_t = m[1] + stats[1].log()
            out[a:b] = stats[2] / stats[0] - lse_s + lse_t
    return out.view(lead)
