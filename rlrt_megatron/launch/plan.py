"""`rlrt plan`: per-GPU memory of a recipe at a layout, predicted before a job waits in a queue.

    rlrt plan --recipe qwen3_8b_rlrt [key=value ...] --nodes 4 --gpus-per-node 8 --gpu h100-80gb

Pure arithmetic on the model's shape (its HF `config.json`; a built-in table of the recipe
models' shapes when the path is absent) and the recipe's settings: no torch, no GPU, no weights.
What the trainer allocates, per GPU of the most loaded rank (a pipeline stage with the embedding
or the LM head), in the order it appears:

* weights `P x b_param` (P = this rank's parameter elements; with the distributed optimizer the
  parameters live in DDP's padded contiguous buffer, so P includes that padding);
* gradients: DDP's fp32 grad buffer `P_buf x 4` (`grad_reduce_in_fp32`);
* optimizer: Adam moments `2 x 4` bytes per element plus an fp32 main copy `4` when the params
  are bf16; the distributed optimizer holds only this rank's 1/DP slice of the buffer;
* the teacher copy (RLSD snapshot, SDPO/SRPO EMA): one more copy of this rank's parameters,
  outside DDP's buffer (no padding): `P x b_param` for the snapshot, `P x 4` for the EMA, which
  accumulates in fp32 under a bf16 policy (`make_teacher_copy`);
* activations of one micro-batch of `train.max_tokens_per_microbatch` tokens kept for backward
  (no activation recompute: the trainer has none), per token and layer
  (`activation_bytes_per_token`): q, k, v, the attention output, the norms' saved tensors and
  SwiGLU's, per layer spec (`te` fused norms and flash attention; `torch` torch norms and SDPA;
  `local` torch norms and a dense softmax of `row_len` scores per head); with PP > 1, 1F1B keeps
  PP - k micro-batches of L/PP layers in flight on stage k (the first stage holds L layers'
  worth, as with PP = 1);
* the fused LM head + log-probs (`lm_head_bytes`): no `[T, V]` logits; its input, an fp32
  `[T, h]` gradient accumulator, the `[V/tp, h]` weight gradient and one block of logits;
* the optimizer step's temporaries: torch Adam's `sqrt(v)` over the whole shard (4 bytes per
  element; TE FusedAdam needs none), which exists only when activations do not;
* colocated SGLang: its share of the weights (`bytes / sglang_tp`, bf16) stays on the GPU while
  training (the KV cache is released after sampling); while sampling, the KV cache brings it to
  `sglang_mem_fraction x GPU memory`, next to the trainer's weights, gradients and optimizer.

peak = max(training: static + teacher + max(activations + LM head, optimizer step) + SGLang
weights, sampling: static + teacher + SGLang's whole share) + a fixed CUDA context/allocator
reserve. The weight, gradient and optimizer byte counts are exact for megatron-core 0.16 (checked
against the tensors it allocates, `tests/unit/test_plan_exact.py`); activations are checked on a
GPU by `benchmarks/plan_vs_measured.py` for the `local` and `torch` specs (the `te` terms are
derived from what Transformer Engine saves, not measured here). `auto` specs and dtypes are
planned as on a GPU cluster with the gpu extra: `te`, bfloat16.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlrt_megatron.launch import plan_moe
from rlrt_megatron.launch.layout import check_world, trainer_errors
from rlrt_megatron.launch.plan_shapes import (
    ModelShape,
    PlanError,
    model_shape,
    padded_vocab,
    stage_params,
)

GIB = 2**30

# GPU memory in GiB as the driver reports it (`nvidia-smi`: an "80 GB" H100 has 79.6 GiB).
GPU_MEMORY_GIB: dict[str, float] = {
    "h100-80gb": 79.6,
    "h100-94gb": 93.6,
    "h200-141gb": 139.8,
    "a100-80gb": 79.2,
    "a100-40gb": 39.4,
    "l40s-48gb": 44.4,
    "b200-180gb": 178.4,
}

# Per-GPU memory the prediction cannot see: the CUDA context (~0.5 GiB), NCCL buffers and the
# caching allocator's fragmentation. Reported as its own row.
RESERVE_GIB = 2.0
# `megatron/lm_head.py`: one block of logits and its temporaries (~200 MiB measured at T=32k).
LM_HEAD_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Buffer:
    """megatron DDP's contiguous buffer for one model chunk (`_ParamAndGradBuffer`)."""

    numel: int  # with the distributed optimizer's padding
    params: tuple[tuple[int, int], ...]  # (start, end) of each parameter
    buckets: tuple[tuple[int, int], ...]


def ddp_buffer(params: list[tuple[int, bool, bool]], dp: int, distributed: bool) -> Buffer:
    """Replicates `_ParamAndGradBuffer`'s layout (no bucketing: overlap_grad_reduce is off):
    params in reverse order; with the distributed optimizer each param starts at a multiple of
    64 elements, a shared embedding gets its own bucket and bucket ends are padded to
    lcm(dp, 128)."""

    def pad(n: int, k: int) -> int:
        return math.ceil(n / k) * k

    start, bucket_start, n_in_bucket = 0, 0, 0
    ranges, buckets = [], []

    def close(end: int) -> int:
        nonlocal bucket_start, n_in_bucket
        end = pad(end, math.lcm(dp, 128)) if distributed else end
        buckets.append((bucket_start, end))
        bucket_start, n_in_bucket = end, 0
        return end

    end = 0
    for numel, shared, _ in reversed(params):
        if distributed:
            start = pad(start, 64)
        shared = shared and distributed
        if shared and n_in_bucket:
            start = close(start)
        end = start + numel
        ranges.append((start, end))
        n_in_bucket += 1
        start = close(end) if shared else end
    if n_in_bucket:
        end = close(end)
    return Buffer(numel=end if params else 0, params=tuple(ranges), buckets=tuple(buckets))


def shard_elements(buf: Buffer, dp: int, rank: int | None = None) -> int:
    """Parameter elements in data-parallel rank `rank`'s slice of `buf` (None: the largest
    slice); the distributed optimizer keeps main params and Adam state for exactly these."""
    best = 0
    for r in range(dp) if rank is None else [rank]:
        n = 0
        for b0, b1 in buf.buckets:
            size = (b1 - b0) // dp
            lo, hi = b0 + r * size, b0 + (r + 1) * size
            n += sum(max(0, min(hi, p1) - max(lo, p0)) for p0, p1 in buf.params)
        best = max(best, n)
    return best


@dataclass(frozen=True)
class StaticBytes:
    """Bytes megatron allocates for one rank's weights, gradients and optimizer state."""

    weights: int
    grads: int
    optimizer: int
    optimizer_elements: int  # elements the optimizer updates on this rank
    params: int  # parameter elements (without buffer padding)


def static_bytes(
    shape: ModelShape, *, tp: int, pp: int, dp: int, stage: int, distributed: bool,
    param_bytes: int, dp_rank: int | None = None, fp32_norms: bool = False,
) -> StaticBytes:  # fmt: skip
    """`fp32_norms`: norm weights kept in fp32 in a bf16 model (megatron's own torch norms are
    created so; `build_model` casts them to the params dtype): megatron DDP then keeps them in
    a buffer of their own, without an fp32 main copy."""
    params = stage_params(shape, tp, pp, stage)
    split = fp32_norms and param_bytes != 4
    groups = [
        ([p for p in params if not (split and p[2])], param_bytes),
        ([p for p in params if split and p[2]], 4),
    ]
    weights = grads = opt = n_opt = 0
    for group, nbytes in groups:
        if not group:
            continue
        buf = ddp_buffer(group, dp, distributed)
        n_params = sum(p[0] for p in group)
        # the distributed optimizer: params are views into DDP's padded param buffer
        weights += (buf.numel if distributed else n_params) * nbytes
        grads += buf.numel * 4  # grad_reduce_in_fp32
        n = shard_elements(buf, dp, dp_rank) if distributed else n_params
        main_copy = 4 if nbytes != 4 else 0  # fp32 master weights of bf16 params
        opt += n * (8 + main_copy)
        n_opt += n
    return StaticBytes(weights, grads, opt, n_opt, sum(p[0] for p in params))


# ---- activations ---------------------------------------------------------------------------


# Bytes kept per normalised element by torch's RMSNorm (the `local` and `torch` specs) in a bf16
# model, for the hidden norms (with the next linear's copy of the output) and for Qwen3's q/k
# norms, and per attention score by the `local` spec's dense softmax (fp32 output + its copy in
# the compute dtype). Fitted to H200 measurements (`benchmarks/plan_vs_measured.py`): the norm
# constants on the torch spec (Qwen3-0.6B / 1.7B shapes), the score constant on the local spec
# across rows of 512 to 2048 tokens.
TORCH_HIDDEN_NORM_BYTES = 7.1
TORCH_QK_NORM_BYTES = 4.4
DENSE_SCORE_BYTES = 6.0


def activation_bytes_per_token(
    shape: ModelShape, *, tp: int, act_bytes: int, spec: str, row_len: int
) -> float:
    """Bytes one token keeps for backward in one transformer layer (module docstring).

    Every spec keeps q, k, v and the attention output (linear_proj's input) in the compute
    dtype (e bytes). `te`: fused norms keep their input and output (e each), flash attention a
    per-head fp32 log-sum-exp, the fused SwiGLU its input (gate, up) and fc2 the product (3 f).
    `torch` (SDPA, what a GPU without Transformer Engine runs) and `local` (megatron's pure
    torch modules): torch's RMSNorm keeps `TORCH_*_NORM_BYTES` per normalised element (the two
    hidden norms, Qwen3's q/k norms) and the unfused SwiGLU silu's output too (4 f); `torch`
    attends with SDPA (flash: a log-sum-exp per head), `local` with a dense softmax that keeps
    `DENSE_SCORE_BYTES` per score (`heads / tp x row_len` scores per token).
    """
    h, d, t, e = shape.hidden, shape.head_dim, tp, act_bytes
    q, kv = shape.heads * d // t, shape.kv_heads * d // t
    qk_norm_elems = (q + kv) if shape.qk_norm else 0
    out = (q + 2 * kv + q) * e  # q, k, v and the attention output
    if spec == "te":
        out += 2 * (2 * h) * e  # input_layernorm / pre_mlp_layernorm: input and output
        out += qk_norm_elems * e  # q/k norm inputs
        out += 3 * shape.ffn // t * e  # fc1 output (gate, up) and the SwiGLU product
    else:
        out += (2 * h * TORCH_HIDDEN_NORM_BYTES + qk_norm_elems * TORCH_QK_NORM_BYTES) * e / 2
        out += 4 * shape.ffn // t * e
    if spec == "local":
        out += shape.heads // t * row_len * DENSE_SCORE_BYTES * e / 2
    else:
        out += shape.heads // t * 4  # flash attention's log-sum-exp
    return out


def lm_head_bytes(shape: ModelShape, *, tp: int, tokens: int, act_bytes: int) -> int:
    """The fused LM head + log-probs (`megatron/lm_head.py`): no `[T, V]` logits; it keeps its
    input (the final norm's output) and, in backward, an fp32 `[T, h]` gradient accumulator and
    the `[V/tp, h]` weight gradient, plus one block of logits and its temporaries."""
    v_local = padded_vocab(shape.vocab, tp) // tp
    return (tokens * shape.hidden * (act_bytes + 4) + v_local * shape.hidden * act_bytes
            + LM_HEAD_BLOCK_BYTES)  # fmt: skip


# ---- the plan ------------------------------------------------------------------------------


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    rollout_nodes: int = 0
    ep: int = 1  # expert parallel (MoE)
    etp: int = 0  # expert tensor parallel; 0 = tp

    @property
    def world(self) -> int:
        return (self.nodes - self.rollout_nodes) * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)


@dataclass
class Settings:
    """The recipe settings the memory depends on (`from_config`)."""

    spec: str = "te"
    params_dtype: str = "bfloat16"
    distributed_optimizer: bool = True
    tokens_per_microbatch: int = 16384
    row_len: int = 2048  # tokens per packed row (local spec: the longest sequence)
    longest: int = 0  # the longest sequence (prompt + response): a micro-batch holds at least it
    teacher_copy: bool = False  # RLSD snapshot / SDPO-SRPO EMA
    teacher_fp32: bool = False  # the EMA teacher is built in fp32 whatever the policy's dtype
    topk: int = 0  # SDPO/SRPO top-k support
    sglang: bool = False  # colocated SGLang engine
    sglang_tp: int = 1
    sglang_mem_fraction: float = 0.6
    fused_adam: bool = False  # TE / Apex FusedAdam (no sqrt(v) temporary)

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        from rlrt_megatron.algorithms import get_algorithm

        algo = get_algorithm(cfg.algorithm.name, cfg.algorithm)
        # a plan is for GPUs: `auto` is what it resolves to on a cluster with the gpu extra
        spec = "te" if cfg.model.spec == "auto" else cfg.model.spec
        dtype = "bfloat16" if cfg.model.params_dtype == "auto" else cfg.model.params_dtype
        budget = cfg.train.max_tokens_per_microbatch
        longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        return cls(
            spec=spec,
            params_dtype=dtype,
            distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            tokens_per_microbatch=max(budget, longest),  # one longer sequence raises it
            row_len=longest if spec == "local" else max(budget, longest),
            longest=longest,
            teacher_copy=getattr(algo, "teacher_weights", None) in ("snapshot", "ema"),
            teacher_fp32=getattr(algo, "teacher_weights", None) == "ema",
            topk=int(getattr(getattr(cfg.algorithm, cfg.algorithm.name, None), "topk", 0) or 0),
            sglang=cfg.rollout.engine == "sglang" and cfg.rollout.sglang_colocated,
            sglang_tp=cfg.rollout.sglang_tp,
            sglang_mem_fraction=cfg.rollout.sglang_mem_fraction,
            fused_adam=spec == "te",
        )


@dataclass
class Plan:
    shape: ModelShape
    shape_source: str
    layout: Layout
    settings: Settings
    limit_gib: float
    rows: dict[str, float] = field(default_factory=dict)  # GiB per row
    peak_gib: float = 0.0
    phase: str = ""  # which phase sets the peak
    problems: list[str] = field(default_factory=list)  # layout errors (the plan cannot run)
    suggestion: str = ""

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak_gib <= self.limit_gib


def layout_problems(shape: ModelShape, lay: Layout) -> list[str]:
    out = []
    if lay.world < 1:
        out.append(f"{lay.nodes} node(s) with {lay.rollout_nodes} rollout node(s) leave no GPU")
    elif lay.world % (lay.tp * lay.pp):
        out.append(
            f"{lay.world} GPU(s) is not a multiple of tp {lay.tp} x pp {lay.pp} = {lay.tp * lay.pp}"
        )
    if lay.tp > lay.gpus_per_node:
        out.append(f"tp {lay.tp} > {lay.gpus_per_node} GPU(s) per node")
    if shape.heads % lay.tp or shape.kv_heads % lay.tp:
        out.append(f"tp {lay.tp} does not divide the heads ({shape.heads}, kv {shape.kv_heads})")
    if shape.layers % lay.pp:
        out.append(f"pp {lay.pp} does not divide the {shape.layers} layers")
    return out


def predict(
    shape: ModelShape, lay: Layout, s: Settings, limit_gib: float, shape_source: str = ""
) -> Plan:
    """The per-GPU memory rows (GiB) of the most loaded rank, and the peak."""
    plan = Plan(shape, shape_source, lay, s, limit_gib)
    plan.problems = layout_problems(shape, lay) + plan_moe.moe_problems(
        shape, lay.world, lay.pp, lay.ep, lay.etp or lay.tp
    )
    if plan.problems and lay.world < 1:
        return plan
    dp = max(1, lay.dp)
    pbytes = 2 if s.params_dtype == "bfloat16" else 4
    stages = sorted({0, lay.pp - 1})
    if shape.dense_layers:  # mixed dense / MoE layers: any stage may hold the most experts
        stages = list(range(lay.pp))
    best: dict[str, float] = {}
    for stage in stages:  # the first stage has the embedding, the last the LM head
        st = static_bytes(shape, tp=lay.tp, pp=lay.pp, dp=dp, stage=stage,
                          distributed=s.distributed_optimizer, param_bytes=pbytes)  # fmt: skip
        tokens = s.tokens_per_microbatch
        per_tok = activation_bytes_per_token(
            shape, tp=lay.tp, act_bytes=pbytes, spec=s.spec, row_len=min(s.row_len, tokens)
        )
        # 1F1B: stage k keeps pp - k micro-batches of its L/pp layers; the dense MLP's share
        # only in its dense layers (plan_moe counts the MoE layers' experts)
        n_stage, n_moe = shape.layers // lay.pp, shape.moe_layers(lay.pp, stage)
        moe_tok = 0.0
        if n_moe:
            moe_tok = activation_bytes_per_token(
                dataclasses.replace(shape, ffn=0), tp=lay.tp, act_bytes=pbytes, spec=s.spec,
                row_len=min(s.row_len, tokens),
            )  # fmt: skip
        acts = int(per_tok * tokens) * (n_stage - n_moe) + int(moe_tok * tokens) * n_moe
        acts *= lay.pp - stage
        head = 0
        if stage == lay.pp - 1:
            head = lm_head_bytes(shape, tp=lay.tp, tokens=tokens, act_bytes=pbytes)
            head += tokens * (s.topk + 1) * 4 * 2 if s.topk else 0
        step_tmp = 0 if s.fused_adam else st.optimizer_elements * 4
        teacher = st.params * (4 if s.teacher_fp32 else pbytes) if s.teacher_copy else 0
        sglang_w = sglang_all = 0.0
        if s.sglang:
            total_params = sum(p[0] for p in stage_params(shape, 1, 1, 0))
            total_params += plan_moe.expert_params(shape)  # SGLang holds every expert
            sglang_w = total_params * 2 / max(1, s.sglang_tp)
            sglang_all = max(sglang_w, s.sglang_mem_fraction * limit_gib * GIB)
        moe = plan_moe.moe_rows(shape, lay.world, lay.tp, lay.pp, lay.ep, lay.etp or lay.tp,
                                pbytes, s.distributed_optimizer, tokens, stage)  # fmt: skip
        static = st.weights + st.grads + st.optimizer + teacher + moe["static"]
        train = static + max(acts + head + moe["activations"], step_tmp) + sglang_w
        sample = static + sglang_all
        opt_row = f"optimizer (distributed, 1/{dp})" if s.distributed_optimizer else "optimizer"
        rows = {
            "weights": st.weights,
            "gradients (fp32)": st.grads,
            opt_row: st.optimizer,
            "teacher copy" + (" (fp32 EMA)" if s.teacher_fp32 else ""): teacher,
            f"activations ({tokens} tokens/micro-batch)": acts,
            "LM head / log-prob buffers": head,
            "optimizer step temporaries": step_tmp,
            "SGLang weights (training)": sglang_w,
            "SGLang weights + KV cache (sampling)": sglang_all,
            **moe["rows"],
            "CUDA context / allocator reserve": RESERVE_GIB * GIB,
        }  # fmt: skip
        peak = max(train, sample) + RESERVE_GIB * GIB
        if peak / GIB > plan.peak_gib or not best:
            plan.peak_gib = peak / GIB
            plan.phase = ("training" if train >= sample else "sampling") + f", stage {stage}"
            best = {k: v / GIB for k, v in rows.items()}
    plan.rows = best
    return plan


def render(plan: Plan) -> str:
    lay, s, shape = plan.layout, plan.settings, plan.shape
    lines = [
        f"model: {shape.name} ({plan.shape_source}): {shape.layers} layers, hidden {shape.hidden}, "
        f"ffn {shape.ffn}, heads {shape.heads}/{shape.kv_heads}, vocab {shape.vocab}"
        + (
            f"; {shape.moe_layers()} MoE layers x {shape.experts} experts (top-{shape.topk}, "
            f"ffn {shape.moe_ffn}), {len(shape.dense_layers)} dense"
            if shape.experts
            else ""
        ),
        f"layout: {lay.nodes} node(s) x {lay.gpus_per_node} GPU(s)"
        + (f" ({lay.rollout_nodes} rollout node(s))" if lay.rollout_nodes else "")
        + f" = {lay.world} training ranks: tp {lay.tp} x pp {lay.pp} x dp "
        + (f"(ep {lay.ep}, etp {lay.etp or lay.tp}) " if shape.experts else "")
        + (f"{lay.dp}; " if not plan.problems else "-; ")
        + f"{s.params_dtype}, spec {s.spec}, distributed optimizer "
        f"{'on' if s.distributed_optimizer else 'off'}, activation recompute off",
    ]
    if plan.problems:
        lines.append("layout problems: " + "; ".join(plan.problems))
    else:
        lines.append(f"per GPU (GiB), peak in {plan.phase}:")
        width = max(len(k) for k in plan.rows)
        for k, v in plan.rows.items():
            if v > 0:
                lines.append(f"  {k:<{width}}  {v:8.2f}")
        lines.append(f"  {'peak':<{width}}  {plan.peak_gib:8.2f}  of {plan.limit_gib:.1f}")
        from rlrt_megatron.launch.plan_checkpoint import save_lines  # its own module (host RAM)

        lines += save_lines(shape, lay, s)
    if plan.suggestion:
        lines.append(f"suggestion: {plan.suggestion}")
    lines.append(summary_line(plan))
    return "\n".join(lines)


def summary_line(plan: Plan) -> str:
    peak = "nan" if plan.problems else f"{plan.peak_gib:.1f}"
    return f"fits={'yes' if plan.fits else 'no'} peak_gib={peak} limit_gib={plan.limit_gib:.1f}"


# ---- suggestions ---------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def suggest(plan: Plan, valid: Callable[[Layout], bool] | None = None) -> str:
    """The smallest change that fits: one setting changed (layout, tokens per micro-batch,
    distributed optimizer, SGLang's memory fraction), else more nodes; '' if none found.
    `valid(layout)`: whether the trainer accepts a layout (its world-size checks)."""
    shape, lay, s, lim = plan.shape, plan.layout, plan.settings, plan.limit_gib
    cands: list[tuple[float, str, Plan]] = []
    ok = valid or (lambda _lay: True)

    def trial(cost: float, text: str, lay2: Layout, s2: Settings) -> None:
        p = predict(shape, lay2, s2, lim)
        if p.fits and ok(lay2):
            cands.append((cost, text, p))

    if not s.distributed_optimizer:
        trial(1, "parallel.use_distributed_optimizer=true",
              lay, dataclasses.replace(s, distributed_optimizer=True))  # fmt: skip
    for tp in _divisors(lay.gpus_per_node):
        for pp in _divisors(shape.layers):
            if (tp, pp) != (lay.tp, lay.pp) and tp * pp <= max(lay.world, 1):
                changed = [f"parallel.tp={tp}"] * (tp != lay.tp) + [f"parallel.pp={pp}"] * (
                    pp != lay.pp
                )
                cost = 2 + math.log2(tp * pp / (lay.tp * lay.pp)) if tp * pp > 1 else 2
                trial(abs(cost) + len(changed) - 1, " ".join(changed),
                      dataclasses.replace(lay, tp=tp, pp=pp), s)  # fmt: skip
    tok = s.tokens_per_microbatch
    layouts = [(0.0, "", lay)] + [
        (2 + abs(math.log2(tp * pp / (lay.tp * lay.pp))),
         " ".join([f"parallel.tp={tp}"] * (tp != lay.tp) + [f"parallel.pp={pp}"] * (pp != lay.pp)),
         dataclasses.replace(lay, tp=tp, pp=pp))
        for tp in _divisors(lay.gpus_per_node) for pp in _divisors(shape.layers)
        if (tp, pp) != (lay.tp, lay.pp) and tp * pp <= max(lay.world, 1)
    ]  # fmt: skip
    for k in (2, 4, 8, 16):
        t2 = tok // k
        if t2 < max(s.longest, 1):  # the trainer raises a smaller budget to the longest
            continue
        s2 = dataclasses.replace(s, tokens_per_microbatch=t2, row_len=min(s.row_len, t2))
        for cost, text, lay2 in layouts:  # fewer tokens, alone or with another layout
            trial(cost + 2 + math.log2(k),
                  f"{text} train.max_tokens_per_microbatch={t2}".strip(), lay2, s2)  # fmt: skip
    if s.sglang:
        for frac in (0.5, 0.4, 0.3):
            if frac < s.sglang_mem_fraction:
                trial(2 + (s.sglang_mem_fraction - frac) * 10,
                      f"rollout.sglang_mem_fraction={frac}", lay,
                      dataclasses.replace(s, sglang_mem_fraction=frac))  # fmt: skip
    if cands:
        cost, text, p = min(cands, key=lambda c: (c[0], c[2].peak_gib))
        return f"{text} (peak {p.peak_gib:.1f} GiB)"
    for nodes in (2, 4, 8, 16, 32, 64, 128):
        if nodes <= lay.nodes:
            continue
        gpn = max(lay.gpus_per_node, 8 if lay.gpus_per_node < 8 else lay.gpus_per_node)
        lay2 = dataclasses.replace(lay, nodes=nodes + lay.rollout_nodes, gpus_per_node=gpn)
        p = predict(shape, lay2, s, lim)
        if p.fits and ok(lay2):
            return (
                f"--nodes {nodes + lay.rollout_nodes} --gpus-per-node {gpn} "
                f"(peak {p.peak_gib:.1f} GiB)"
            )
    return ""


# ---- entry points --------------------------------------------------------------------------


def gpu_limit(kind: str | None, mem_gib: float | None) -> float:
    if mem_gib is not None:
        if not math.isfinite(mem_gib) or mem_gib <= 0:
            raise PlanError(f"--gpu-mem-gib {mem_gib}: must be a finite number of GiB > 0")
        return float(mem_gib)
    if not kind:
        raise PlanError("give --gpu KIND or --gpu-mem-gib X")
    key = kind.lower()
    if key not in GPU_MEMORY_GIB:
        raise PlanError(
            f"--gpu {kind}: unknown GPU kind; known: {', '.join(GPU_MEMORY_GIB)} "
            "(or pass --gpu-mem-gib X)"
        )
    return GPU_MEMORY_GIB[key]


def _trainer_accepts(cfg: Any, lay: Layout) -> bool:
    c = copy.deepcopy(cfg)
    c.parallel.tp, c.parallel.pp = lay.tp, lay.pp
    c.parallel.sequence_parallel = c.parallel.sequence_parallel and lay.tp > 1
    return not trainer_errors(c, nodes=lay.nodes, gpus_per_node=lay.gpus_per_node,
                              rollout_nodes=lay.rollout_nodes)  # fmt: skip


def plan_config(
    cfg: Any, *, nodes: int, gpus_per_node: int, limit_gib: float, rollout_nodes: int = 0,
    check: bool = True,
) -> Plan:  # fmt: skip
    """The plan of a validated TrainConfig at a cluster layout, with a suggestion if it does
    not fit. The trainer's own validation at the layout's world size is one of its problems
    (suggesting the nearest layouts it accepts that fit; `check=False` skips it)."""
    shape, source = model_shape(cfg.model.hf_path, cfg.model.build_tiny)
    lay = Layout(nodes, gpus_per_node, cfg.parallel.tp, cfg.parallel.pp, rollout_nodes,
                 ep=cfg.parallel.ep, etp=cfg.parallel.etp)  # fmt: skip
    settings = Settings.from_config(cfg)
    if rollout_nodes:
        settings = dataclasses.replace(settings, sglang=False)  # servers on their own nodes
    plan = predict(shape, lay, settings, limit_gib, source)
    if check and not plan.problems:  # the trainer's check at this world size (`layout.py`)

        def fits(c: Any, n: int, k: int) -> bool:
            return plan_config(c, nodes=n, gpus_per_node=gpus_per_node, limit_gib=limit_gib,
                               rollout_nodes=k, check=False).fits  # fmt: skip

        errs, near = check_world(cfg, nodes=nodes, gpus_per_node=gpus_per_node,
                                 rollout_nodes=rollout_nodes, fits=fits)  # fmt: skip
        plan.problems += [f"the trainer refuses this world size: {e}" for e in errs]
        if errs:
            plan.suggestion = "; ".join(near) or "no layout nearby passes; change the recipe"
            return plan
    if not plan.fits:
        plan.suggestion = suggest(plan, lambda lay2: _trainer_accepts(cfg, lay2))
    return plan
