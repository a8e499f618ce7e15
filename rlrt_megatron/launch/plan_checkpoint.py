"""`rlrt plan`: what saving a checkpoint costs in host memory and on disk (the GPU rows are in
`plan.py`; the save adds nothing on the GPU).

What `trainer/checkpoint.py`'s save holds in host memory with megatron-core 0.16 (the
`fully_reshardable` optimizer format in megatron's memory-efficient variant), per process, with
N = parameter elements of one TP x PP shard and W = the weight (+ teacher copy) bytes it writes:

* distributed optimizer, data-parallel rank 0 of each TP x PP group: the group's optimizer
  shards gathered over gloo into three fp32 host tensors (main params, exp_avg, exp_avg_sq:
  12 N), built from its own slice (12 N / DP) and, key by key, the received pieces and their
  concatenation while the previous key's concatenation is still alive (12 N); then the writer
  stages what this rank writes: a copy of the gathered state (written from views, which
  megatron's writer clones: 12 N) and the weights copied off the GPU (W). Peak:
  24 N + max(12 N / DP, W). Measured on CPU (`benchmarks/checkpoint_memory.py`, DP 2, fp32):
  30 bytes per parameter on rank 0, 6 on rank 1, as counted here;
* its other data-parallel ranks: their own slice, 12 N / DP (replicas: they write nothing);
* the plain optimizer: each rank holds the whole state on the GPU and data-parallel rank 0 writes
  it, copied to the host: 12 N (8 N for fp32 params: no main copy) + W; the others nothing.

Megatron's default variant (all-gathered through GPU buffers onto every data-parallel rank)
holds 24 N + 12 N / DP on every data-parallel rank (measured: 30 bytes per parameter at DP 2):
printed beside it. The busiest node is the first one (ranks 0..g-1; megatron's order puts TP
fastest, then DP, then PP). On disk: each weight once (and the teacher copy) plus the optimizer
state, 12 (or 8) bytes per parameter.
"""

from __future__ import annotations

from typing import Any

from rlrt_megatron.launch.plan_shapes import ModelShape, stage_params

GIB = 2**30


def save_cost(shape: ModelShape, lay: Any, s: Any) -> dict[str, float]:
    """Host bytes of a checkpoint save (`dp0`: the busiest process, data-parallel rank 0 of a
    group; `other`: the other data-parallel ranks; `node`: the busiest node; `default_dp`: each
    data-parallel rank under megatron's default variant) and `disk` bytes."""
    tp, pp, dp = lay.tp, lay.pp, max(1, lay.dp)
    pbytes = 2 if s.params_dtype == "bfloat16" else 4
    tbytes = (4 if getattr(s, "teacher_fp32", False) else pbytes) if s.teacher_copy else 0
    opt_per = 12 if s.distributed_optimizer or pbytes != 4 else 8
    n_stage = [sum(p[0] for p in stage_params(shape, tp, pp, k)) for k in range(pp)]

    def per_rank(stage: int, dp_rank: int) -> float:
        n = n_stage[stage]
        w = n * (pbytes + tbytes)
        if not s.distributed_optimizer:
            return opt_per * n + w if dp_rank == 0 else 0.0
        if dp_rank:
            return 12 * n / dp
        return 24 * n + max(12 * n / dp, w)

    node = sum(
        per_rank(r // (tp * dp), (r // tp) % dp) for r in range(min(lay.gpus_per_node, lay.world))
    )
    total = sum(n_stage) * tp
    return {
        "dp0": max(per_rank(k, 0) for k in range(pp)),
        "other": max(per_rank(k, 1) for k in range(pp)) if dp > 1 else 0.0,
        "node": node,
        # megatron's default variant: every data-parallel rank gathers as rank 0 does here
        "default_dp": max(24 * n + 12 * n / dp for n in n_stage) if s.distributed_optimizer else 0,
        "disk": total * (pbytes + tbytes + opt_per),
    }


def save_lines(shape: ModelShape, lay: Any, s: Any) -> list[str]:
    """The `rlrt plan` rows of a checkpoint save."""
    c = {k: v / GIB for k, v in save_cost(shape, lay, s).items()}
    line = f"  host memory, data-parallel rank 0  {c['dp0']:8.2f}"
    if c["other"] or lay.dp > 1:
        line += f"   other ranks  {c['other']:.2f}"
    if c["default_dp"] and lay.dp > 1:
        line += f"   (megatron's default variant: {c['default_dp']:.2f} on every rank)"
    return [
        "checkpoint save (GiB, host; fully_reshardable, memory-efficient; nothing on the GPU):",
        line,
        f"  host memory, busiest node          {c['node']:8.2f}",
        f"  on disk per checkpoint             {c['disk']:8.2f}",
    ]
