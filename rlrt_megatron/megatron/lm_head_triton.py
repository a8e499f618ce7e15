"""Triton kernels for :mod:`lm_head`'s fused path: one pass over a logits block per step.

A block is the cuBLAS product `z = hidden_chunk @ weight_block.T` `[c, w]` (bf16 on GPU). The
torch reference (`lm_head._TorchBlocks`) makes several fp32 `[c, w]` temporaries per block; these
kernels read the block once (statistics) or read and overwrite it once (gradient), in fp32
registers:

* `stats`: per row, online update of (m, s, a, z_y) with the block (see `lm_head` for the
  formulas); the running state lives in `[c]` fp32 vectors, so a row's state flows from one vocab
  block to the next (and the blocks of a row can come from different launches).
* `grad`: per row, `g_j = g_lp ([j = y] - p_j) - g_H p_j (log p_j + H)`, `p_j = exp(z_j - lse)`,
  written over z in its own dtype (the block is dead after its two backward matmuls).

One program per row, looping over the row's columns in `BLOCK_V` tiles. The module imports
without CUDA; `available()` says whether the kernels can run (CUDA, or `TRITON_INTERPRET=1`
on CPU tensors, which the unit tests use).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["TritonBlocks", "available"]

_BLOCK_V = 2048
_NUM_WARPS = 8


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return torch.cuda.is_available() or _interpret()


@triton.jit
def _stats_kernel(
    z_ptr,
    stride_z,
    ncols,
    tgt_ptr,
    v0,
    m_ptr,
    s_ptr,
    a_ptr,
    zt_ptr,
    WITH_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    zrow = z_ptr + row.to(tl.int64) * stride_z
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    a = tl.load(a_ptr + row)
    zt = tl.load(zt_ptr + row)
    t = tl.load(tgt_ptr + row) - v0  # local column of the target in this block (any if absent)
    for start in range(0, ncols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < ncols
        x = tl.load(zrow + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        # empty state (s = 0, m = -inf) contributes nothing (and must not make 0 * inf = nan)
        live = s > 0.0
        alpha = tl.where(live, tl.exp(m - new_m), 0.0)
        xs = tl.where(mask, x - new_m, 0.0)
        e = tl.where(mask, tl.exp(xs), 0.0)
        if WITH_ENT:
            old_a = tl.where(live, a + (m - new_m) * s, 0.0)
            a = alpha * old_a + tl.sum(e * xs, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = new_m
        zt = zt + tl.sum(tl.where(mask & (cols == t), x, 0.0), axis=0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(a_ptr + row, a)
    tl.store(zt_ptr + row, zt)


@triton.jit
def _grad_kernel(
    z_ptr,
    stride_z,
    ncols,
    tgt_ptr,
    v0,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    WITH_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    zrow = z_ptr + row.to(tl.int64) * stride_z
    lse = tl.load(lse_ptr + row)
    gl = tl.load(glp_ptr + row)
    t = tl.load(tgt_ptr + row) - v0
    h = tl.load(ent_ptr + row)
    ge = tl.load(gent_ptr + row)
    for start in range(0, ncols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < ncols
        x = tl.load(zrow + cols, mask=mask, other=0.0).to(tl.float32)
        lp = x - lse
        p = tl.exp(lp)
        if WITH_ENT:
            g = p * (-ge * (lp + h) - gl)
        else:
            g = -gl * p
        g = g + tl.where(cols == t, gl, 0.0)
        tl.store(zrow + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


class TritonBlocks:
    """Same interface and semantics as `lm_head._TorchBlocks` (see there)."""

    @staticmethod
    def stats(z, v0, tgt, m, s, a, zt, with_entropy):
        c, w = z.shape
        if c == 0:
            return
        assert z.stride(1) == 1 and m.is_contiguous() and tgt.is_contiguous()
        _stats_kernel[(c,)](
            z, z.stride(0), w, tgt, v0, m, s, a, zt,
            WITH_ENT=with_entropy, BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS,
        )  # fmt: skip

    @staticmethod
    def grad(z, v0, tgt, lse, ent, g_lp, g_ent, with_entropy):
        c, w = z.shape
        if c == 0:
            return
        assert z.stride(1) == 1
        _grad_kernel[(c,)](
            z, z.stride(0), w, tgt, v0, lse, ent, g_lp, g_ent,
            WITH_ENT=with_entropy, BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS,
        )  # fmt: skip
