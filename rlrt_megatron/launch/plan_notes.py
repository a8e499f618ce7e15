"""The lines `rlrt plan` prints under its memory table: where the rollouts run and how weights
reach them, a warning when the peak is within the margin of the limit, and a rough step-time
estimate from the planner's FLOPs at a stated MFU (to choose `--time` and count requeues).

Step time, per step of `train.prompts_per_step x rollout.group_size` sequences of
`data.max_prompt_tokens + RESPONSE_FRACTION x rollout.max_new_tokens` tokens (responses are
assumed to average that fraction of the limit): forward FLOPs per token `2 N + 2 L h c` (N
parameters, L layers, hidden h, c the mean causal context); the update is 3 forwards per PPO
epoch, plus one forward each for the recomputed old log-probs and the teacher when the recipe
has them. Training phases at `TRAIN_MFU` of the GPUs' dense bf16 peak; generation (2 N per
generated token, memory-bound decoding) at `GEN_MFU`. A first estimate only: the logged
`time/*` metrics of the first steps are the real numbers.
"""

from __future__ import annotations

from typing import Any

from rlrt_megatron.launch.plan import Plan
from rlrt_megatron.launch.plan_shapes import stage_params

# Dense bf16 peak TFLOP/s per GPU (vendor datasheets, without sparsity).
PEAK_TFLOPS = {
    "h100-80gb": 989.0,
    "h100-94gb": 989.0,
    "h200-141gb": 989.0,
    "a100-80gb": 312.0,
    "a100-40gb": 312.0,
    "l40s-48gb": 362.0,
    "b200-180gb": 2250.0,
}
TRAIN_MFU = 0.35
GEN_MFU = 0.05
RESPONSE_FRACTION = 0.5
# The `te` spec's activation terms are derived, not measured (README): a peak within this many
# GiB of the limit may not fit.
MARGIN_GIB = 4.0


def rollout_line(cfg: Any, plan: Plan) -> str:
    r, lay = cfg.rollout, plan.layout
    if r.engine != "sglang":
        return f"rollouts: rollout.engine={r.engine} on the trainer's rank 0 (weights copied in)"
    tp = max(1, r.sglang_tp)
    if lay.rollout_nodes:
        n = lay.rollout_nodes * max(1, lay.gpus_per_node // tp)
        where = f"on {lay.rollout_nodes} rollout node(s)"
        mode = r.sglang_sync_mode or "distributed"
    else:
        n = r.sglang_num_servers or lay.world // tp
        where = "colocated on the training GPUs (KV cache released after sampling)"
        mode = r.sglang_sync_mode or "tensor"
    return f"rollouts: {n} SGLang server(s) of tp {tp} {where}; weight sync {mode}"


def peak_notes(plan: Plan) -> list[str]:
    """Which SGLang line is in the peak, and the margin warning."""
    out = []
    s = plan.settings
    if s.sglang and not plan.problems:
        sampling = plan.phase.startswith("sampling")
        out.append(
            "SGLang weights + KV cache (sampling) is "
            + ("the peak (sampling phase)" if sampling else "not in the peak (training phase)")
            + "; SGLang weights (training) is "
            + ("not in it" if sampling else "in it")
        )
    if plan.fits and plan.limit_gib - plan.peak_gib < MARGIN_GIB and s.spec == "te":
        out.append(
            f"warning: the peak is within {MARGIN_GIB:g} GiB of the limit and the te spec's "
            "activation terms are derived, not measured: leave margin with a smaller "
            "train.max_tokens_per_microbatch or parallel.sequence_parallel=true (with tp > 1)"
        )
    return out


def step_time_line(cfg: Any, plan: Plan, gpu: str | None) -> str:
    if not gpu or gpu.lower() not in PEAK_TFLOPS or plan.problems:
        return ""
    shape, lay = plan.shape, plan.layout
    n = sum(p[0] for p in stage_params(shape, 1, 1, 0))
    t, r = cfg.train, cfg.rollout
    seqs = t.prompts_per_step * r.group_size
    resp = RESPONSE_FRACTION * r.max_new_tokens
    tokens = seqs * (cfg.data.max_prompt_tokens + resp)
    ctx = (cfg.data.max_prompt_tokens + resp) / 2
    fwd = tokens * (2 * n + 2 * shape.layers * shape.hidden * ctx)
    passes = 3 * t.ppo_epochs + bool(getattr(t, "recompute_old_logprobs", True))
    from rlrt_megatron.algorithms import get_algorithm

    passes += bool(getattr(get_algorithm(cfg.algorithm.name, cfg.algorithm), "needs_teacher", 0))
    peak = PEAK_TFLOPS[gpu.lower()] * 1e12
    train_s = fwd * passes / (TRAIN_MFU * peak * lay.world)
    gen_gpus = lay.rollout_nodes * lay.gpus_per_node or lay.world
    gen_s = seqs * resp * 2 * n / (GEN_MFU * peak * gen_gpus)
    return (
        f"step time (rough): ~{(train_s + gen_s) / 60:.1f} min = generation {gen_s / 60:.1f} "
        f"(MFU {GEN_MFU:g}) + training {train_s / 60:.1f} (MFU {TRAIN_MFU:g}) for {seqs} "
        f"sequences of ~{cfg.data.max_prompt_tokens + resp:.0f} tokens (responses assumed "
        f"{RESPONSE_FRACTION:g} x max_new_tokens); {t.steps} steps "
        f"~{t.steps * (train_s + gen_s) / 3600:.0f} h"
    )


def notes(cfg: Any, plan: Plan, gpu: str | None) -> list[str]:
    """The lines under the table (module docstring)."""
    out = [rollout_line(cfg, plan), *peak_notes(plan), step_time_line(cfg, plan, gpu)]
    return [ln for ln in out if ln]
