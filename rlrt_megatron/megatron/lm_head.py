"""LM head fused with the log-probs: token log-probs, entropy, log-probs at ids and top-k ids
straight from hidden states, vocab-parallel, never holding `[tokens, vocab]` logits.

The column-parallel LM head gives shard r of the TP group the logits of global ids
`[r * V/tp, (r+1) * V/tp)`: `z = hidden @ weight.T` with `weight` the local `[V/tp, H]` shard.
Instead of materialising `z` for all tokens, every function here walks 2-D blocks
`[tokens chunk, vocab block]` of it: one matmul (cuBLAS on GPU, fp32 accumulate), then the block's
contribution to per-token statistics, in fp32, with an online log-sum-exp across vocab blocks:

    m = max_j z_j,   s = sum_j exp(z_j - m),   a = sum_j exp(z_j - m) (z_j - m),   z_y
    lse = m + log s,   logp = (z_y - m) - log s,   H = log s - a / s

Across the TP group only `[T]`-sized statistics travel (one MAX and one SUM all-reduce per call,
after all local blocks). Backward recomputes each block's logits and forms the gradient in place:

    d logp / d z_j = [j = y] - p_j,   d H / d z_j = -p_j (log p_j + H),   p_j = exp(z_j - lse)

then `grad_hidden += g_z @ W_block` (fp32 accumulator per token chunk, all-reduced over TP: the
LM head's input is replicated, so its gradient is the sum over shards, as Megatron's
column-parallel layer gives it) and `grad_weight[block] += g_z.T @ hidden_chunk` (accumulated in
the weight's dtype: one rounding per token chunk in bf16; everything else is fp32).

Memory: one logits block (+ on the torch path a few fp32 block temporaries) plus `[T]` statistics;
no `[T, V]` tensor on any device. Exact gradients (no filtering of small probabilities).

Block ops (what a block contributes) come in two implementations with the same semantics:
`_TorchBlocks` (any device, the reference; `impl="chunked"`) and the Triton kernels of
:mod:`lm_head_triton` (`impl="fused"`, CUDA; one pass over a bf16 block, no fp32 copies).
`impl="naive"` is the plain `log_softmax(hidden @ weight.T)` (full logits; tests/benchmarks).

Measured on one H200 (T=32k, H=4096, V=151,936, bf16; `benchmarks/logprobs_memory.py`): forward
67.5 ms with 33 MiB above the inputs (naive 87.8 ms / 37 GiB; the block matmuls alone take
56 ms), forward+backward 260 ms with 1.6 GiB (= the two gradients + 194 MiB; naive 240 ms /
56 GiB); log-probs within 1.5e-2 of fp32 (the bf16 logits' own rounding, as naive bf16).

Temperature: `temperature=T` gives softmax(z / T), the distribution a rollout engine sampling at
T reports; 1/T multiplies each fp32 logits block inside the block ops (and the block's gradient,
by the chain rule), so no scaled copy of the hidden states or the weight is made.

Vocab padding (ids >= `true_vocab_size`, a global size) never enters a max, a sum, top-k or a
gradient. Log-probs are computed as `(z_y - m) - log s` with `z_y` taken from the same block
values as `s` (so `s >= exp(z_y - m)`) and clamped at 0: never positive, whatever the dtype.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

from rlrt_megatron.megatron.tp_reduce import all_reduce, group_rank_size

__all__ = ["LogprobsImpl", "inverse_temperature", "lm_head_logprobs", "resolve_impl"]

LogprobsImpl = Literal["auto", "fused", "chunked", "naive"]
_IMPLS = ("auto", "fused", "chunked", "naive")

# Block shapes (tokens x vocab). GPU: big enough for cuBLAS to run near peak (M, N >= 4096),
# small against the budget (forward 32 MiB bf16 logits block; backward 64 MiB + a [M, H] fp32
# grad_hidden accumulator). CPU: a few MiB so the block temporaries stay in cache.
_BLOCKS = {
    "cuda": {"fwd": (4096, 4096), "bwd": (4096, 8192)},
    "cpu": {"fwd": (256, 2048), "bwd": (256, 2048)},
}


# ----------------------------------------------------------------------------------------------
# Shard bookkeeping and dispatch
# ----------------------------------------------------------------------------------------------
class _Shard(NamedTuple):
    start: int  # global id of local row 0 of the weight shard
    n_valid: int  # local rows [0, n_valid) are real tokens; the rest are vocab padding


def _shard(local_vocab: int, group, true_vocab_size: int | None) -> tuple[_Shard, int]:
    rank, size = group_rank_size(group)
    start = rank * local_vocab
    end = (
        start + local_vocab
        if true_vocab_size is None
        else min(start + local_vocab, int(true_vocab_size))
    )
    return _Shard(start, max(0, end - start)), size


def resolve_impl(impl: str, device: torch.device) -> str:
    """`auto` -> `fused` on CUDA when Triton imports, else `chunked`. `fused` off CUDA or without
    Triton falls back to `chunked` (same results; the fused kernels only exist for CUDA)."""
    if impl not in _IMPLS:
        raise ValueError(f"logprobs impl must be one of {_IMPLS}, got {impl!r}")
    if impl in ("auto", "fused"):
        if device.type == "cuda" and _triton_blocks() is not None:
            return "fused"
        return "chunked"
    return impl


def _triton_blocks():
    try:
        from rlrt_megatron.megatron import lm_head_triton
    except ImportError:  # no triton
        return None
    return lm_head_triton.TritonBlocks if lm_head_triton.available() else None


def _blocks_for(impl: str):
    return _triton_blocks() if impl == "fused" else _TorchBlocks


def _block_shape(dev: torch.device, phase: str, chunk_size: int | None) -> tuple[int, int]:
    m, v = _BLOCKS["cuda" if dev.type == "cuda" else "cpu"][phase]
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        m = chunk_size
    return m, v


def _check_inputs(hidden, weight, ids, true_vocab_size, size, what="target", check_ids=True):
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree: expected "
            "hidden [..., H] and the local LM-head shard weight [V/tp, H]"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    # Only on CPU: on GPU the check would force a host sync per call. Callers that validated
    # the ids once for many calls (`megatron/forward.py`) pass check_ids=False.
    if check_ids and ids.device.type == "cpu" and ids.numel():
        limit = weight.shape[0] * size if true_vocab_size is None else int(true_vocab_size)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= limit:
            raise ValueError(
                f"{what} ids must lie in [0, {limit}) (the true vocabulary), got min {lo} max "
                f"{hi}; mask padding positions with a valid id (e.g. 0) and drop them afterwards"
            )


def _vocab_blocks(shard: _Shard, vb: int):
    """(v0, v1) ranges over the local real rows [0, n_valid) in steps of vb."""
    for v0 in range(0, shard.n_valid, vb):
        yield v0, min(shard.n_valid, v0 + vb)


def _local_index(ids: torch.Tensor, shard: _Shard) -> torch.Tensor:
    """Local row of each global id; ids outside this shard's real rows map to -1."""
    idx = ids - shard.start
    return torch.where((idx >= 0) & (idx < shard.n_valid), idx, torch.full_like(idx, -1))


# ----------------------------------------------------------------------------------------------
# Block ops, torch reference (any device). A block is z [c, w] = logits of local vocab rows
# [v0, v0 + w) for c tokens; `tgt` are local rows (-1 = not here).
# ----------------------------------------------------------------------------------------------
class _TorchBlocks:
    @staticmethod
    def stats(z, v0, tgt, m, s, a, zt, with_entropy, scale=1.0):
        """Online update of (m, s, a, zt) [c] fp32 with block `scale * z` (in place)."""
        zf = _scaled(z, scale)
        mb = zf.amax(-1)
        new_m = torch.maximum(m, mb)
        # old terms rescaled to the new max; empty state (s = 0, m = -inf) contributes nothing
        alpha = torch.where(s > 0, (m - new_m).exp(), torch.zeros_like(s))
        zs = zf - new_m[:, None]
        e = zs.exp()
        if with_entropy:
            old_a = torch.where(s > 0, a + (m - new_m) * s, torch.zeros_like(a))
            a.copy_(alpha * old_a + torch.bmm(e.unsqueeze(1), zs.unsqueeze(2)).view(-1))
        s.copy_(alpha * s + e.sum(-1))
        m.copy_(new_m)
        j = tgt - v0
        here = (j >= 0) & (j < z.shape[1])
        got = zf.gather(1, j.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        zt.copy_(torch.where(here, got, zt))

    @staticmethod
    def grad(z, v0, tgt, lse, ent, g_lp, g_ent, with_entropy, scale=1.0):
        """The block's gradient d(sum g_lp logp + g_ent H)/dz of the logits `scale * z`,
        written into z (in place)."""
        zf = _scaled(z, scale)
        p = (zf - lse[:, None]).exp()
        if with_entropy:
            coef = (zf - (lse - ent)[:, None]).mul_(-g_ent[:, None]).sub_(g_lp[:, None])
            g = p.mul_(coef)
        else:
            g = p.mul_(-g_lp[:, None])
        j = tgt - v0
        here = (j >= 0) & (j < z.shape[1])
        g.scatter_add_(1, j.clamp(0, z.shape[1] - 1)[:, None], (g_lp * here)[:, None])
        if scale != 1.0:
            g.mul_(scale)  # chain rule through z -> scale * z
        z.copy_(g)


def _scaled(z: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * z` in fp32 (`z` itself in fp32 when scale is 1: bit-identical to no scaling)."""
    zf = z.float()
    return zf * scale if scale != 1.0 else zf


# ----------------------------------------------------------------------------------------------
# Part 1: token log-probs (+ entropy)
# ----------------------------------------------------------------------------------------------
def _combine_tp(m, s, a, zt, group, size):
    """Global (lse, logp, entropy) from per-shard online statistics (2 collectives of [T])."""
    if size > 1:
        gm = m.clone()
        all_reduce(gm, dist.ReduceOp.MAX, group, size)
        live = s > 0
        scale = torch.where(live, (m - gm).exp(), torch.zeros_like(s))
        st = torch.stack(
            [
                scale * s,
                torch.where(live, scale * (a + (m - gm) * s), torch.zeros_like(a)),
                zt,
            ]
        )
        all_reduce(st, dist.ReduceOp.SUM, group, size)
        m, (s, a, zt) = gm, st
    log_s = s.log()
    logp = ((zt - m) - log_s).clamp_(max=0.0)
    ent = (log_s - a / s).clamp_(min=0.0)
    return m + log_s, logp, ent


def _logprobs_forward(
    hidden, weight, target, shard, group, size, with_entropy, blocks, chunk, scale=1.0
):
    n, dev = hidden.shape[0], hidden.device
    mb, vb = _block_shape(dev, "fwd", chunk)
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    a = torch.zeros(n, dtype=torch.float32, device=dev)
    zt = torch.zeros(n, dtype=torch.float32, device=dev)  # 0 unless this shard owns the target
    tgt = _local_index(target, shard)
    buf = None
    for t0 in range(0, n, mb):
        t1 = min(n, t0 + mb)
        h = hidden[t0:t1]
        for v0, v1 in _vocab_blocks(shard, vb):
            z = _mm_block(h, weight[v0:v1], buf)
            buf = z if buf is None else buf
            blocks.stats(
                z, v0, tgt[t0:t1], m[t0:t1], s[t0:t1], a[t0:t1], zt[t0:t1], with_entropy, scale
            )
    return _combine_tp(m, s, a, zt, group, size)


def _mm_block(h: torch.Tensor, w: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """z = h @ w.T in the inputs' dtype, reusing `buf`'s storage (no allocation per block)."""
    c, v = h.shape[0], w.shape[0]
    if buf is None or buf.numel() < c * v:
        return h @ w.t()
    out = buf.view(-1)[: c * v].view(c, v)
    return torch.mm(h, w.t(), out=out)


def _logprobs_backward(
    hidden,
    weight,
    target,
    lse,
    ent,
    g_lp,
    g_ent,
    shard,
    group,
    size,
    with_entropy,
    blocks,
    chunk,
    need_h,
    need_w,
    scale=1.0,
):
    n, dev = hidden.shape[0], hidden.device
    mb, vb = _block_shape(dev, "bwd", chunk)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None  # padding rows keep 0
    tgt = _local_index(target, shard)
    g_lp = g_lp.float().contiguous()
    g_ent = g_ent.float().contiguous()
    buf = tmp = None
    for t0 in range(0, n, mb):
        t1 = min(n, t0 + mb)
        h = hidden[t0:t1]
        acc = torch.zeros(t1 - t0, hidden.shape[1], dtype=torch.float32, device=dev)
        for v0, v1 in _vocab_blocks(shard, vb):
            w = weight[v0:v1]
            z = _mm_block(h, w, buf)
            buf = z if buf is None else buf
            blocks.grad(
                z, v0, tgt[t0:t1], lse[t0:t1], ent[t0:t1], g_lp[t0:t1], g_ent[t0:t1],
                with_entropy, scale,
            )  # fmt: skip
            if need_h:
                if acc.dtype == z.dtype:
                    acc.addmm_(z, w)
                elif not _addmm_fp32_out(acc, z, w):
                    # bf16 without cuBLAS fp32 output: the product in bf16, the sum in fp32
                    tmp = _mm_into(z, w, tmp)
                    acc.add_(tmp)
            if need_w:
                grad_w[v0:v1].addmm_(z.t(), h)
        if need_h:
            all_reduce(acc, dist.ReduceOp.SUM, group, size)
            grad_h[t0:t1] = acc
    return grad_h, grad_w


_FP32_OUT: dict[str, bool] = {}


def _addmm_fp32_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """acc += a @ b with low-precision a, b and fp32 acc in one cuBLAS call (torch's `out_dtype`
    addmm, CUDA only, newer torch). False (nothing done) where unsupported."""
    if acc.device.type != "cuda" or _FP32_OUT.get("addmm") is False:
        return False
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        _FP32_OUT["addmm"] = False
        return False
    _FP32_OUT["addmm"] = True
    return True


def _mm_into(a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    c, h = a.shape[0], b.shape[1]
    if buf is None or buf.numel() < c * h:
        return a @ b
    return torch.mm(a, b, out=buf.view(-1)[: c * h].view(c, h))


class _LMHeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, target, shard, group, size, with_entropy, blocks, chunk, scale=1.0
    ):
        lse, logp, ent = _logprobs_forward(
            hidden, weight, target, shard, group, size, with_entropy, blocks, chunk, scale
        )
        ctx.save_for_backward(hidden, weight, target, lse, ent)
        ctx.meta = (shard, group, size, with_entropy, blocks, chunk, scale)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, target, lse, ent = ctx.saved_tensors
        shard, group, size, with_entropy, blocks, chunk, scale = ctx.meta
        if g_ent is None or not with_entropy:
            g_ent = torch.zeros_like(lse)
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        gh, gw = _logprobs_backward(
            hidden,
            weight,
            target,
            lse,
            ent,
            g_lp,
            g_ent,
            shard,
            group,
            size,
            with_entropy,
            blocks,
            chunk,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            scale,
        )
        return gh, gw, None, None, None, None, None, None, None, None


class _CopyToTP(torch.autograd.Function):
    """Identity; backward all-reduces over TP (the column-parallel LM head's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _GatherVocab(torch.autograd.Function):
    """All-gather vocab shards; backward keeps the local slice (every rank has the same loss)."""

    @staticmethod
    def forward(ctx, z, group, size):
        parts = [torch.empty_like(z) for _ in range(size)]
        dist.all_gather(parts, z.contiguous(), group=group)
        ctx.meta = (dist.get_rank(group), z.shape[-1])
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        rank, w = ctx.meta
        return g[..., rank * w : (rank + 1) * w].contiguous(), None, None


def _naive_logits(hidden, weight, group, size, true_vocab_size, temperature=1.0):
    """Full-vocabulary fp32 logits / temperature (all-gathered over TP; padding columns
    dropped). Test/bench only."""
    if size > 1:
        hidden = _CopyToTP.apply(hidden, group)
    z = hidden.float() @ weight.float().t()
    if size > 1:
        z = _GatherVocab.apply(z, group, size)
    if true_vocab_size is not None:
        z = z[:, : int(true_vocab_size)]
    return z / temperature if temperature != 1.0 else z


def inverse_temperature(temperature: float) -> float:
    """`1 / temperature`, checked (the sampler's temperature: finite, > 0)."""
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(
            f"temperature must be finite and > 0 (the sampler's rollout.temperature), got {t}"
        )
    return 1.0 / t


def lm_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    with_entropy: bool = False,
    true_vocab_size: int | None = None,
    chunk_size: int | None = None,
    impl: LogprobsImpl = "auto",
    temperature: float = 1.0,
    check_ids: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `target` (and entropy) under softmax(hidden @ weight.T / temperature) over a
    TP-sharded vocabulary, from hidden states, never building `[T, V]` logits.

    logp_t = z_t,y_t - log sum_j exp(z_tj),  H_t = log sum_j exp(z_tj) - sum_j p_tj z_tj,
    z = hidden @ W.T / temperature, j over the true vocabulary of all ranks of `group`.

    Args:
        hidden: `[..., H]` LM-head input (replicated over the TP group), any float dtype.
        weight: `[V/tp, H]` local LM-head shard (same dtype); shard r holds global ids
            `[r * V/tp, (r+1) * V/tp)`.
        target: `[...]` global token ids in [0, true_vocab_size).
        group: the tensor-parallel group; None = `weight` is the whole vocabulary.
        with_entropy: also return the (differentiable) entropy.
        true_vocab_size: GLOBAL vocabulary size; ids >= it are padding rows and are excluded.
        chunk_size: tokens per block (default: per device, see `_BLOCKS`).
        impl: `auto` (fused Triton on CUDA, chunked otherwise), `fused`, `chunked`, `naive`.
        temperature: the sampler's temperature T (> 0): the distribution is softmax(z / T),
            what an engine sampling at T reports (1/T is applied to each fp32 logits block,
            and to the gradient, inside the block ops; T = 1 is bit-identical to no scaling).
        check_ids: check on CPU that every target lies in the true vocabulary (False: the
            caller validated them already; on GPU the check never runs, it would sync).

    Returns:
        fp32 log-probs shaped like `target` (<= 0), and fp32 entropy if asked. Differentiable
        w.r.t. `hidden` (the full gradient, summed over the TP group) and `weight`.
    """
    shape = target.shape
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    if flat_h.shape[0] != target.numel() or hidden.shape[:-1] != shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree: expected "
            "hidden [..., H] and target [...] with the same leading dimensions"
        )
    tgt = target.reshape(-1).long()
    shard, size = _shard(weight.shape[0], group, true_vocab_size)
    _check_inputs(flat_h, weight, tgt, true_vocab_size, size, check_ids=check_ids)
    scale = inverse_temperature(temperature)
    mode = resolve_impl(impl, flat_h.device)
    if mode == "naive":
        z = _naive_logits(flat_h, weight, group, size, true_vocab_size, temperature)
        lsm = torch.log_softmax(z, -1)
        lp = lsm.gather(-1, tgt[:, None]).squeeze(-1)
        if with_entropy:
            return lp.view(shape), (-(lsm.exp() * lsm).sum(-1)).view(shape)
        return lp.view(shape)
    flat_h = flat_h.contiguous()
    weight_c = weight if weight.is_contiguous() else weight.contiguous()
    blocks = _blocks_for(mode)
    if torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad):
        lp, ent = _LMHeadLogprobs.apply(
            flat_h, weight_c, tgt, shard, group, size, with_entropy, blocks, chunk_size, scale
        )
    else:
        with torch.no_grad():
            _, lp, ent = _logprobs_forward(
                flat_h, weight_c, tgt, shard, group, size, with_entropy, blocks, chunk_size, scale
            )
    if with_entropy:
        return lp.view(shape), ent.view(shape)
    return lp.view(shape)
