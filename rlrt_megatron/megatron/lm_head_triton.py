"""Triton kernels for :mod:`lm_head`'s fused path: one pass over a logits block per step.

A block is the cuBLAS product `z = hidden_chunk @ weight_block.T` `[c, w]` (bf16 on GPU). The
torch reference (`lm_head._TorchBlocks`) makes several fp32 `[c, w]` temporaries per block; these
kernels read the block once (statistics) or read and overwrite it once (gradient), in fp32
registers:

Both scale the block by `scale` = 1 / temperature in fp32 registers (the logits the sampler
used are `z / T`); the gradient kernel multiplies its result by `scale` again (chain rule).

* `stats`: per row, online update of (m, s, a, z_y) with the block (see `lm_head` for the
  formulas); the running state lives in `[c]` fp32 vectors, so a row's state flows from one vocab
  block to the next (and the blocks of a row can come from different launches). A program takes
  `BLOCK_M` rows and walks their columns in `[BLOCK_M, BLOCK_V]` tiles.
* `grad`: `g_j = g_lp ([j = y] - p_j) - g_H p_j (log p_j + H)`, `p_j = exp(z_j - lse)`, written
  over z in its own dtype (the block is dead after its two backward matmuls); elementwise, one
  program per `[BLOCK_M, BLOCK_V]` tile.

The module imports without CUDA; `available()` says whether the kernels can run (CUDA, or
`TRITON_INTERPRET=1` on CPU tensors, which the unit tests use).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

__all__ = ["TritonBlocks", "available"]

# (BLOCK_M, BLOCK_V, num_warps) per kernel; measured on an H200 on [4096, 4096..8192] bf16 blocks.
CONFIG = {"stats": (2, 1024, 4), "grad": (16, 512, 4)}
# Tuning runs (benchmarks) may override it: RLRT_LM_HEAD_TRITON_CONFIG='{"stats": [4, 1024, 4]}'.
CONFIG.update(
    {k: tuple(v) for k, v in json.loads(os.environ.get("RLRT_LM_HEAD_TRITON_CONFIG", "{}")).items()}
)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return torch.cuda.is_available() or _interpret()


@triton.jit
def _stats_kernel(
    z_ptr,
    stride_z,
    nrows,
    ncols,
    tgt_ptr,
    v0,
    m_ptr,
    s_ptr,
    a_ptr,
    zt_ptr,
    scale,
    WITH_ENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < nrows
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    zt = tl.load(zt_ptr + rows, mask=rmask, other=0.0)
    # local column of each row's target in this block (never matches when absent: -1 - v0 < 0)
    t = tl.load(tgt_ptr + rows, mask=rmask, other=-1) - v0
    zrow = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    for start in range(0, ncols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < ncols)[None, :]
        x = tl.load(zrow + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * scale
        new_m = tl.maximum(m, tl.max(x, axis=1))
        new_m = tl.where(rmask, new_m, 0.0)  # rows past the end: keep everything finite
        # empty state (s = 0, m = -inf) contributes nothing (and must not make 0 * inf = nan)
        live = s > 0.0
        alpha = tl.where(live, tl.exp(m - new_m), 0.0)
        xs = tl.where(mask, x - new_m[:, None], 0.0)
        e = tl.where(mask, tl.exp(xs), 0.0)
        if WITH_ENT:
            old_a = tl.where(live, a + (m - new_m) * s, 0.0)
            a = alpha * old_a + tl.sum(e * xs, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = new_m
        hit = mask & (cols[None, :] == t[:, None])
        zt = zt + tl.sum(tl.where(hit, x, 0.0), axis=1)
    tl.store(m_ptr + rows, m, mask=rmask)
    tl.store(s_ptr + rows, s, mask=rmask)
    tl.store(a_ptr + rows, a, mask=rmask)
    tl.store(zt_ptr + rows, zt, mask=rmask)


@triton.jit
def _grad_kernel(
    z_ptr,
    stride_z,
    nrows,
    ncols,
    tgt_ptr,
    v0,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    scale,
    WITH_ENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < nrows
    mask = rmask[:, None] & (cols < ncols)[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    gl = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
    h = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    ge = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
    t = tl.load(tgt_ptr + rows, mask=rmask, other=-1) - v0
    ptrs = z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * scale
    lp = x - lse[:, None]
    p = tl.exp(lp)
    if WITH_ENT:
        g = p * (-ge[:, None] * (lp + h[:, None]) - gl[:, None])
    else:
        g = -gl[:, None] * p
    g = (g + tl.where(cols[None, :] == t[:, None], gl[:, None], 0.0)) * scale
    tl.store(ptrs, g.to(z_ptr.dtype.element_ty), mask=mask)


class TritonBlocks:
    """Same interface and semantics as `lm_head._TorchBlocks` (see there)."""

    @staticmethod
    def stats(z, v0, tgt, m, s, a, zt, with_entropy, scale=1.0):
        c, w = z.shape
        if c == 0 or w == 0:
            return
        assert z.stride(1) == 1 and m.is_contiguous() and tgt.is_contiguous()
        bm, bv, warps = CONFIG["stats"]
        _stats_kernel[(triton.cdiv(c, bm),)](
            z, z.stride(0), c, w, tgt, v0, m, s, a, zt, float(scale),
            WITH_ENT=with_entropy, BLOCK_M=bm, BLOCK_V=bv, num_warps=warps,
        )  # fmt: skip

    @staticmethod
    def grad(z, v0, tgt, lse, ent, g_lp, g_ent, with_entropy, scale=1.0):
        c, w = z.shape
        if c == 0 or w == 0:
            return
        assert z.stride(1) == 1
        bm, bv, warps = CONFIG["grad"]
        _grad_kernel[(triton.cdiv(c, bm), triton.cdiv(w, bv))](
            z, z.stride(0), c, w, tgt, v0, lse, ent, g_lp, g_ent, float(scale),
            WITH_ENT=with_entropy, BLOCK_M=bm, BLOCK_V=bv, num_warps=warps,
        )  # fmt: skip
