"""TEST SUPPORT ONLY: the two `sgl_kernel` CPU helpers SGLang's CPU path imports, in plain torch.

What it replaces: SGLang 0.5.23 on `--device cpu` imports `assign_req_to_token_pool_cpu`
(sglang/srt/mem_cache/allocation.py) and `copy_all_layer_kv_cache_cpu`
(sglang/kernels/ops/kvcache/cache_move.py) from its kernel package `sgl_kernel`. PyPI's
`sglang-kernel` holds CUDA builds only, and its CPU build is a source build for AMX Xeons. On
other CPUs SGLang already falls back to plain torch for norm, rope and attention; these two
helpers are all that is missing. Each one here does what the Triton kernel beside its call site
does (the GPU path), element for element.

Its speculative-decoding modules also import six EAGLE kernels at start-up
(`build_tree_kernel_efficient_cpu`, `verify_tree_greedy_cpu`, ...); the tier never enables
speculative decoding, so those names exist only to be imported and raise if ever called.

Why here: the `sglang` test tier (`make test-sglang`) runs the REAL SGLang server on this
2-core CPU machine. The tier (tests/real_sglang/conftest.py) puts `tests/sglang_cpu` on the
server's PYTHONPATH; nothing else imports this package, and a GPU install never sees it.
"""

from __future__ import annotations

import ctypes

import torch

# imported by sglang/kernels/ops/speculative/{spec_tree,cache_locs,eagle}.py; unused here
SPECULATIVE_ONLY = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
)

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu", *SPECULATIVE_ONLY]


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = the next end[i]-start[i] entries of
    `out_cache_loc` (request i's slice starts after the lengths of requests 0..i-1), in place:
    the Triton `assign_req_to_token_pool` of allocation.py. `pool_len` = req_to_token.shape[1]
    (the kernel's row stride; a view of the same rows here)."""
    del pool_len  # the row stride, implied by req_to_token's shape
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    off = 0
    for row, s, e in zip(rows, starts, ends, strict=True):
        n = e - s
        if n > 0:
            req_to_token[row, s:e] = out_cache_loc[off : off + n].to(req_to_token.dtype)
        off += n


def _rows(ptr: int, row_bytes: int, n_rows: int) -> torch.Tensor:
    """A [n_rows, row_bytes] uint8 view of the memory at `ptr` (a KV buffer of the pool)."""
    buf = (ctypes.c_uint8 * (row_bytes * n_rows)).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8).view(n_rows, row_bytes)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every KV buffer b (its base address data_ptrs[b], `strides[b]` bytes per token slot):
    slot tgt_loc[i] = slot src_loc[i], all sources read before any target is written (the
    Triton `copy_all_layer_kv_cache_tiled` of cache_move.py, "safe for in-place copy")."""
    if tgt_loc.numel() == 0:
        return
    src = src_loc.to(torch.long)
    tgt = tgt_loc.to(torch.long)
    n_rows = int(torch.maximum(src.max(), tgt.max())) + 1
    for ptr, row_bytes in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        view = _rows(int(ptr), int(row_bytes), n_rows)
        view[tgt] = view[src].clone()


def _speculative_only(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}: speculative decoding is not available with the test tier's "
            "CPU helpers (tests/sglang_cpu); run without --speculative-algorithm"
        )

    kernel.__name__ = name
    return kernel


globals().update({name: _speculative_only(name) for name in SPECULATIVE_ONLY})
