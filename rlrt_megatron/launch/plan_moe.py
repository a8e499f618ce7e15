"""`rlrt plan` rows of a mixture-of-experts model (Qwen3-MoE), added to the dense plan.

The dense accounting (`plan.py`) covers the embedding, attention, norms, LM head and the dense
MLP of the layers that have one (Qwen3-MoE's `mlp_only_layers` / `decoder_sparse_step`; none
when every layer is MoE, `ffn = 0`). What the experts add, per GPU of the most loaded rank, with
`M` the MoE layers of the pipeline stage (`L/pp` when every layer is MoE):

* expert weights: `M` layers x `E/ep` experts x `3 h f_moe / etp` elements (SwiGLU fc1
  `[2 f, h]`, fc2 `[h, f]`), plus each layer's router `[E, h]` (replicated);
* their fp32 gradients (`grad_reduce_in_fp32`) and Adam state (`2 x 4` + an fp32 main copy of
  bf16 params): expert weights are data-parallel over the *expert*-DP group of
  `world / (ep x etp x pp)` ranks, so the distributed optimizer shards them 1/expert-DP;
* activations kept for backward, per token and MoE layer: the router's fp32 logits and probs
  (`2 x E x 4`), the permuted tokens each of the top-k experts reads (`k x h`), the SwiGLU fc1
  output and product (`k x 3 f_moe / etp`) and the experts' outputs before the weighted combine
  (`k x h`), in the compute dtype; with TP > 1 megatron needs sequence parallelism for MoE, so
  each TP rank routes 1/tp of the tokens;
* the dispatcher's transient buffers in the layer being run (alltoall: the permuted send buffer,
  the received tokens and the expert output on its way back, `3 x k x h` per token), counted
  once (they are freed before the next layer).

Layout rules (`moe_problems`): `ep` divides the expert count and `pp x ep x etp` the training
ranks; `etp` divides `f_moe`.
"""

from __future__ import annotations

from rlrt_megatron.launch.plan_shapes import ModelShape


def expert_dp(world: int, pp: int, ep: int, etp: int) -> int:
    """The expert-data-parallel size: ranks holding the same experts."""
    return max(1, world // (pp * ep * etp))


def expert_params(shape: ModelShape) -> int:
    """Every expert and router element of the model (0 for a dense model)."""
    return shape.moe_layers() * shape.experts * (3 * shape.hidden * shape.moe_ffn + shape.hidden)


def moe_problems(shape: ModelShape, world: int, pp: int, ep: int, etp: int) -> list[str]:
    out = []
    if not shape.experts:
        if ep > 1:
            out.append(f"ep {ep} needs a mixture-of-experts model ({shape.name} is dense)")
        return out
    if shape.experts % ep:
        out.append(f"ep {ep} does not divide the {shape.experts} experts")
    if world % (pp * ep * etp):
        out.append(f"{world} GPU(s) is not a multiple of pp {pp} x ep {ep} x etp {etp}")
    if shape.moe_ffn % etp:
        out.append(f"etp {etp} does not divide moe_intermediate_size {shape.moe_ffn}")
    return out


def moe_static_bytes(
    shape: ModelShape, *, world: int, pp: int, ep: int, etp: int, param_bytes: int,
    distributed: bool, stage: int = 0,
) -> dict[str, int]:  # fmt: skip
    """Expert weights, gradients and optimizer state on one rank of pipeline `stage` (bytes)."""
    layers = shape.moe_layers(pp, stage)
    experts = layers * (shape.experts // ep) * 3 * shape.hidden * shape.moe_ffn // etp
    routers = layers * shape.experts * shape.hidden
    n = experts + routers
    shard = expert_dp(world, pp, ep, etp) if distributed else 1
    main_copy = 4 if param_bytes != 4 else 0
    return {
        "weights": n * param_bytes,
        "grads": n * 4,
        "optimizer": (experts // shard + routers) * (8 + main_copy),
        "experts": experts,
    }


def moe_activation_bytes_per_token(
    shape: ModelShape, *, tp: int, etp: int, act_bytes: int
) -> float:
    """Bytes one token keeps for backward in one MoE layer on a TP rank (module docstring)."""
    k, h, e = shape.topk, shape.hidden, act_bytes
    router = 2 * shape.experts * 4
    experts = (2 * k * h + k * 3 * shape.moe_ffn // etp) * e
    return (router + experts) / tp  # sequence parallel: 1/tp of the tokens per rank


def dispatcher_bytes(shape: ModelShape, *, tokens: int, tp: int, act_bytes: int) -> int:
    """The alltoall dispatcher's buffers in flight in one layer (module docstring)."""
    return 3 * tokens * shape.topk * shape.hidden * act_bytes // tp


def moe_rows(
    shape: ModelShape, world: int, tp: int, pp: int, ep: int, etp: int, param_bytes: int,
    distributed: bool, tokens: int, stage: int,
) -> dict:  # fmt: skip
    """The experts' part of a plan on pipeline `stage`: `static` and `activations` bytes and
    the table `rows`; zeros for a dense model."""
    if not shape.experts:
        return {"static": 0, "activations": 0, "rows": {}}
    st = moe_static_bytes(shape, world=world, pp=pp, ep=ep, etp=etp, param_bytes=param_bytes,
                          distributed=distributed, stage=stage)  # fmt: skip
    per_tok = moe_activation_bytes_per_token(shape, tp=tp, etp=etp, act_bytes=param_bytes)
    # 1F1B: stage k keeps pp - k micro-batches of its layers, as for the dense terms
    acts = int(per_tok * tokens) * shape.moe_layers(pp, stage) * (pp - stage)
    acts += dispatcher_bytes(shape, tokens=tokens, tp=tp, act_bytes=param_bytes)
    rows = {
        f"expert weights (1/ep {ep}) + routers": st["weights"],
        "expert gradients (fp32)": st["grads"],
        f"expert optimizer (1/expert-dp {expert_dp(world, pp, ep, etp)})": st["optimizer"],
        "MoE activations + dispatcher buffers": acts,
    }
    static = st["weights"] + st["grads"] + st["optimizer"]
    return {"static": static, "activations": acts, "rows": rows}
