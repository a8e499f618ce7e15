"""Helpers shared by the vocab-parallel log-prob code (`logprobs.py`, `lm_head.py`,
`lm_head_ids.py`): the rank and size of a tensor-parallel group, and collectives that are no-ops
on one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

# Smallest positive fp32: the floor of a probability (or sum of exp) before a log; e.g. a tail
# bucket is exactly zero when k covers every token of non-negligible mass, and log(0) = -inf
# would turn 0 * log 0 terms of a divergence into NaN.
TINY = torch.finfo(torch.float32).tiny


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when there is no group or no distributed init."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(t: torch.Tensor, op: dist.ReduceOp, group, size: int) -> torch.Tensor:
    """In-place all-reduce of `t` over `group` (nothing to do when `size` is 1)."""
    if size > 1:
        dist.all_reduce(t, op=op, group=group)
    return t
