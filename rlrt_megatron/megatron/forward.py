"""Response log-probs of the Megatron policy: student/teacher views, packed rows, PP-aware.

The trainer's two uses:

* `logprobs` phase - :func:`student_teacher_logprobs`: one no-grad forward over every rollout's
  student sequence (prompt + response) and one over its teacher sequence (teacher context +
  prompt + response, with the current weights or a separate teacher model), returning padded
  `[B, T_resp]` student and teacher log-probs (+ entropies, + the student's top-k support with the
  teacher's log-probs on it for SDPO/SRPO) on every pipeline rank.
* `update` phase - :func:`forward_backward_responses`: the same packed forward with grad, per
  micro-batch through Megatron's `get_forward_backward_func` (no pipelining, 1F1B or
  interleaved), calling the trainer's loss on `[n, T_resp]` blocks of the micro-batch's rollouts.

Memory: the LM head runs only on the positions whose log-prob is needed (response positions,
shifted by one), never on the prompt or the teacher context, so a long teacher context costs no
`[T, V]` logits. Megatron's `GPTModel` applies `output_layer` to every position and offers no
position selection (its inference path can keep only the *last* token), so
:func:`lm_head_only_at` intercepts the output layer's input with a forward pre-hook and hands it
the selected hidden states `[N, 1, H]` instead of `[S, B, H]`, and (`hidden_only=True`, what the
passes here use) skips the layer's matmul, so `GPTModel` returns those hidden states `[1, N, H]`.
The rest of the model (embedding, decoder, final norm, PP stage boundaries) runs unchanged. The
loss function then computes the log-probs straight from the hidden states and the LM-head weight
(the tied embedding or the output layer's own) with :mod:`rlrt_megatron.megatron.lm_head`: the
vocabulary in blocks, never `[N, V/tp]` logits, the weight's gradient through plain autograd (so
Megatron DDP's hooks collect it). `logprobs_impl` picks the implementation (`auto` = fused
Triton kernels on CUDA, chunked torch on CPU; `naive` = full logits, for comparison).

Temperature: the rollout engine samples from softmax(logits / T) and reports those log-probs
(`rollout.temperature`), so every pass here takes `temperature` and divides the logits by T,
in all four outputs: the student's log-probs (the PPO ratio's numerator and, recomputed, its
old log-probs; TIS/MIS and the sync check compare them with the engine's, so both sides must be
the sampler's distribution), the teacher's (Delta = teacher - student must compare the two
at the same temperature, or an unchanged teacher, e.g. RLRT's empty context, would not give
Delta = 0), the entropies (the sampling distribution's; SRPO's teacher-entropy weights and
the logged entropy describe what is sampled) and the top-k log-probs with their tail (SDPO /
SRPO distil the tempered distributions on the student's support; the ids themselves do not
depend on T). T = 1 is bit-identical to no scaling.

Megatron's `Float16Module` would cast the last stage's output (here the selected hidden states)
to fp32; `_mb_outputs` casts them back to the LM-head weight's dtype, so it costs a copy only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from rlrt_megatron import platform
from rlrt_megatron.megatron.lm_head import LogprobsImpl, lm_head_logprobs
from rlrt_megatron.megatron.lm_head_ids import lm_head_logprobs_at_ids, lm_head_topk
from rlrt_megatron.megatron.logprobs import support_entropy
from rlrt_megatron.megatron.model import true_vocab_size
from rlrt_megatron.megatron.moe.routing import clear_replay, replay_microbatch
from rlrt_megatron.megatron.packing import PackedMicroBatch, block_causal_mask, pack_sequences
from rlrt_megatron.megatron.parallel import unwrap_model

__all__ = [
    "ResponseLogprobs",
    "compute_response_logprobs",
    "forward_backward_responses",
    "lm_head_only_at",
    "student_teacher_logprobs",
]

AttentionLayout = Literal["auto", "mask", "thd"]


@dataclass
class ResponseLogprobs:
    """Per-response-token results, padded to `[B, T_resp]` (rollouts in input order).

    logprobs: fp32 log pi(y_t | y_<t) of each response token; 0 where `mask` is False.
    mask: bool, True on real response tokens.
    entropy: fp32 full-vocabulary entropy per position, if asked.
    topk_ids: `[B, T, K]` int64 support (the student's top-k, or the ids passed in), if any.
    topk_logprobs: `[B, T, K+1]` log-probs at `topk_ids` then the tail bucket, if any.
    topk_entropy: `[B, T]` entropy over that K+1 support, if any.
    """

    logprobs: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_entropy: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# LM head on selected positions only
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def lm_head_only_at(
    model: torch.nn.Module, select: torch.Tensor, hidden_only: bool = False
) -> Iterator[None]:
    """While active, `model`'s output layer sees only hidden states at `select`.

    `select` indexes the s-major flattening of the decoder output `[S, B, H]` (index = s * B + b);
    the model then returns logits `[1, N, V/tp]`, or with `hidden_only` the selected hidden
    states `[1, N, H]` themselves (the output layer's matmul is skipped; the caller applies the
    LM-head weight, :func:`lm_head_weight`, fused with the log-probs). A no-op on pipeline stages
    without the head. With sequence parallelism the decoder output is sequence-sharded: it is
    all-gathered first (backward: split, no reduction) and the layer's `sequence_parallel` flag
    is lowered for this call, so the replicated selection goes through a plain column-parallel
    matmul whose input gradient Megatron all-reduces over TP - the same switch GPTModel's own
    inference path uses. (With `hidden_only`, `lm_head_logprobs` all-reduces that gradient.)
    """
    gpt = unwrap_model(model)
    if not getattr(gpt, "post_process", False):
        yield
        return
    if getattr(gpt.config, "mtp_num_layers", None):
        raise NotImplementedError("response-only LM head with multi-token prediction layers")
    layer = gpt.output_layer
    seq_parallel = bool(layer.sequence_parallel)

    def pre_hook(module, args, kwargs):
        hidden = args[0]
        if seq_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=module.tp_group
            )
            module.sequence_parallel = False
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, select)
        return (picked.unsqueeze(1), *args[1:]), kwargs

    def post_hook(module, args, kwargs, output):
        module.sequence_parallel = seq_parallel

    handles = [
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        layer.register_forward_hook(post_hook, with_kwargs=True),
    ]
    if hidden_only:
        # An instance attribute shadows ColumnParallelLinear.forward (hooks still run); GPTModel
        # then returns the [N, 1, H] selection transposed to [1, N, H].
        layer.forward = lambda input_, weight=None, runtime_gather_output=None: (input_, None)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if hidden_only:
            del layer.forward
        layer.sequence_parallel = seq_parallel


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The local `[V/tp, H]` LM-head weight GPTModel applies: the shared embedding when tied
    (on the last PP stage Megatron keeps a synced copy), else the output layer's own."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _attention_layout(model: torch.nn.Module, layout: AttentionLayout) -> str:
    """`layout`, or for "auto" what the model's core attention takes: the local spec's
    `DotProductAttention` rejects `PackedSeqParams` and needs a dense `[b, 1, s, s]` mask
    ("mask"); Transformer Engine and the `torch` spec's `SDPAttention` attend within the
    `cu_seqlens` segments of one long row ("thd", nothing quadratic in the row length; TE would
    also ignore a mask under a causal mask type)."""
    if layout != "auto":
        return layout
    gpt = unwrap_model(model)
    layers = gpt.decoder.layers
    core = layers[0].self_attention.core_attention if len(layers) else None
    return "mask" if core is None or type(core).__name__ == "DotProductAttention" else "thd"


# ----------------------------------------------------------------------------------------------
# Per-micro-batch outputs on the last stage
# ----------------------------------------------------------------------------------------------
def _response_len(
    sequences: Sequence[Sequence[int]], response_starts: Sequence[int], response_len: int | None
) -> int:
    """``T_resp`` of the returned blocks: ``response_len`` or the longest response."""
    if response_len is not None:
        return response_len
    return max((len(s) - r for s, r in zip(sequences, response_starts, strict=True)), default=0)


def _to_block(x: torch.Tensor, mb: PackedMicroBatch, t_resp: int) -> torch.Tensor:
    """[N, ...] per selected position -> [n, T_resp, ...] (zeros off the responses)."""
    out = x.new_zeros(mb.rollout_index.numel(), t_resp, *x.shape[1:])
    return out.index_put((mb.dst_row, mb.dst_col), x)


def _mb_outputs(
    mb: PackedMicroBatch,
    hidden: torch.Tensor,
    model: torch.nn.Module,
    t_resp: int,
    with_entropy: bool,
    topk: int,
    topk_ids: torch.Tensor | None,
    impl: LogprobsImpl = "auto",
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Log-probs (+ entropy, + top-k) of one micro-batch from the selected `[1, N, H]` hidden
    states, fused with the LM head (no `[N, V/tp]` logits; see `lm_head`)."""
    from megatron.core import parallel_state

    weight = lm_head_weight(model)
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)  # [N, H]
    kw = dict(
        group=parallel_state.get_tensor_model_parallel_group(),
        true_vocab_size=true_vocab_size(model),
        impl=impl,
    )
    ids = None
    if topk_ids is not None:  # a support fixed earlier (the student's, from the logprobs phase)
        ids = topk_ids.to(hidden.device)[mb.rollout_index[mb.dst_row], mb.dst_col]
    elif topk > 0:
        ids = lm_head_topk(hidden.detach(), weight.detach(), topk, **kw)
    # top-k ids need no temperature (1/T keeps the order of the logits); the targets were
    # validated once before the schedule, the top-k ids are the model's own
    kw.update(temperature=temperature, check_ids=False)
    lp = lm_head_logprobs(hidden, weight, mb.targets, with_entropy=with_entropy, **kw)
    out: dict[str, torch.Tensor] = {"rollout_index": mb.rollout_index}
    if with_entropy:
        lp, ent = lp
        out["entropy"] = _to_block(ent, mb, t_resp)
    out["logprobs"] = _to_block(lp, mb, t_resp)
    out["mask"] = _to_block(torch.ones_like(mb.targets, dtype=torch.bool), mb, t_resp)
    if ids is not None:
        k_lp = lm_head_logprobs_at_ids(hidden, weight, ids, **kw)
        out["topk_ids"] = _to_block(ids, mb, t_resp)
        out["topk_logprobs"] = _to_block(k_lp, mb, t_resp)
    return out


# ----------------------------------------------------------------------------------------------
# Through Megatron's schedule
# ----------------------------------------------------------------------------------------------
LossFn = Callable[[PackedMicroBatch, dict[str, torch.Tensor]], tuple]


def forward_backward_responses(
    model_chunks: Sequence[torch.nn.Module],
    sequences: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    loss_fn: LossFn,
    *,
    token_budget: int,
    rows_per_microbatch: int = 1,
    pack: bool = True,
    forward_only: bool = False,
    with_entropy: bool = False,
    topk: int = 0,
    topk_ids: torch.Tensor | None = None,
    response_len: int | None = None,
    attention: AttentionLayout = "auto",
    logprobs_impl: LogprobsImpl = "auto",
    temperature: float = 1.0,
    routed: Sequence[torch.Tensor] | None = None,
) -> list[Any]:
    """Packed response forward (+ backward) through Megatron's `get_forward_backward_func`.

    `sequences[i]` = context + response tokens, response from `response_starts[i]`. They are packed
    into micro-batches (see :mod:`packing`); on the last pipeline stage each micro-batch's
    `loss_fn(mb, outputs)` gets `outputs` with `[n, T_resp]` blocks for the micro-batch's
    rollouts `outputs["rollout_index"]` (`[n]`, input order): "logprobs", "mask", and
    "entropy" / "topk_ids" + "topk_logprobs" when asked (`topk` > 0 picks each position's top-k
    from this model; `topk_ids` `[B, T_resp, K]` fixes the support instead). It returns what
    Megatron's schedule expects: `(loss, reduced)` or `(loss_sum, num_tokens, reduced)`
    (`reduced` must not alias `loss`: the schedule scales `loss` in place; `outputs` also holds
    "num_microbatches", the count the schedule divides each loss by, padding included). Returns
    the list of `reduced`, one per micro-batch, on the last stage (empty elsewhere). With
    `forward_only` the whole pass runs under `torch.no_grad()`. `logprobs_impl`:
    `model.logprobs_impl` (see :func:`rlrt_megatron.megatron.lm_head.lm_head_logprobs`).
    `temperature`: every log-prob, entropy and top-k log-prob is of softmax(logits / T) (the
    module docstring says why). `routed`: per sequence, the rollout engine's experts
    `[tokens, moe_layers, k]` (MoE routing replay, `model.moe.routing_replay=rollout`; the model
    must be built with it): every MoE layer routes each token to exactly those experts.
    """
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not sequences:
        return []
    chunks = list(model_chunks)
    layout = _attention_layout(chunks[0], attention)
    if layout == "thd" and rows_per_microbatch != 1:
        raise ValueError("attention='thd' packs one row per micro-batch: rows_per_microbatch=1")
    t_resp = _response_len(sequences, response_starts, response_len)
    config = unwrap_model(chunks[0]).config
    # sequence parallelism splits each row's tokens over the TP ranks: rows a multiple of tp
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    mbs = pack_sequences(
        sequences,
        response_starts,
        -(-token_budget // tp) * tp,
        rows_per_microbatch,
        pack=pack,
        pad_to_multiple=math.lcm(8, tp),
        with_mask=layout == "mask",
        routed=routed,
    )
    _check_targets(mbs, true_vocab_size(chunks[0]))
    if len(chunks) > 1:
        # Megatron's interleaved schedule runs micro-batches in groups of PP size: pad with
        # all-padding micro-batches (no selected positions, zero loss) to a multiple of it.
        from megatron.core import parallel_state

        pp = parallel_state.get_pipeline_model_parallel_world_size()
        mbs += [_padding_microbatch(mbs[0])] * (-len(mbs) % pp)
    dev = platform.device()

    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        host: PackedMicroBatch = next(data_iterator)
        mb = host.to(dev)
        kwargs: dict[str, Any] = {}
        if layout == "thd":
            # from the host copy: read on the device it would be a sync per micro-batch
            max_len = int((host.cu_seqlens[1:] - host.cu_seqlens[:-1]).max())
            kwargs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=mb.cu_seqlens,
                cu_seqlens_kv=mb.cu_seqlens,
                max_seqlen_q=max_len,
                max_seqlen_kv=max_len,
            )
        # Megatron's RoPE ignores position_ids (it rotates by the row position 0..S-1). Packing
        # stays exact anyway: RoPE scores depend only on q/k position differences, and the
        # block-diagonal mask keeps those within one sequence. position_ids (reset per sequence)
        # still matter for absolute position embeddings.
        if mb.routed_experts is not None:
            replay_microbatch([model], mb.routed_experts)
        with lm_head_only_at(model, mb.select, hidden_only=True):
            output = model(
                mb.input_ids, mb.position_ids, attention_mask=mb.attention_mask, **kwargs
            )

        def loss_func(output_tensor: torch.Tensor):
            outs = _mb_outputs(
                mb, output_tensor, model, t_resp, with_entropy, topk, topk_ids, logprobs_impl,
                temperature,
            )  # fmt: skip
            outs["num_microbatches"] = len(mbs)
            return loss_fn(mb, outs)

        return output, loss_func

    iterators: Any = [iter(mbs) for _ in chunks]
    ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    try:
        with ctx:
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(mbs),
                seq_length=mbs[0].input_ids.shape[1],
                micro_batch_size=mbs[0].input_ids.shape[0],
                forward_only=forward_only,
            )
    finally:
        if routed is not None:
            clear_replay(chunks)


def _check_targets(mbs: list[PackedMicroBatch], vocab: int) -> None:
    """Every target id in [0, vocab), checked once on the host copies (never inside the
    schedule, where a check of device values is a host sync per micro-batch)."""
    targets = torch.cat([mb.targets for mb in mbs])
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < vocab):
        raise ValueError(
            f"response token ids must lie in [0, {vocab}) (the sampling vocabulary), got min "
            f"{int(targets.min())} max {int(targets.max())}: the engine and the model disagree "
            "on the tokenizer"
        )


def _padding_microbatch(like: PackedMicroBatch) -> PackedMicroBatch:
    """A micro-batch of the same shape holding only padding (nothing selected)."""
    rows, length = like.input_ids.shape
    none = torch.zeros(0, dtype=torch.int64)
    mask = None
    if like.attention_mask is not None:
        mask = block_causal_mask([], length).expand(rows, 1, length, length)
    return PackedMicroBatch(
        input_ids=torch.zeros_like(like.input_ids),
        position_ids=torch.zeros_like(like.position_ids),
        attention_mask=mask,
        cu_seqlens=torch.arange(rows + 1, dtype=torch.int32) * length,
        select=none,
        targets=none,
        rollout_index=none,
        dst_row=none,
        dst_col=none,
        routed_experts=like.routed_experts,  # any experts: nothing is selected
    )


def _collect(mb: PackedMicroBatch, outs: dict[str, torch.Tensor]):
    zero = torch.zeros((), device=outs["logprobs"].device)
    return zero, {k: v.detach() for k, v in outs.items() if torch.is_tensor(v)}


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            t,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return t


def compute_response_logprobs(
    model_chunks: Sequence[torch.nn.Module],
    sequences: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    *,
    token_budget: int,
    rows_per_microbatch: int = 1,
    pack: bool = True,
    with_entropy: bool = False,
    topk: int = 0,
    topk_ids: torch.Tensor | None = None,
    response_len: int | None = None,
    attention: AttentionLayout = "auto",
    logprobs_impl: LogprobsImpl = "auto",
    temperature: float = 1.0,
    routed: Sequence[torch.Tensor] | None = None,
) -> ResponseLogprobs:
    """No-grad response log-probs `[B, T_resp]` of `sequences`, on every pipeline rank.

    Arguments as :func:`forward_backward_responses`. Only the last stage computes; the results
    are then broadcast over the pipeline group (the mask is rebuilt locally from the lengths).
    """
    n = len(sequences)
    t_resp = _response_len(sequences, response_starts, response_len)
    reduced = forward_backward_responses(
        model_chunks,
        sequences,
        response_starts,
        _collect,
        token_budget=token_budget,
        rows_per_microbatch=rows_per_microbatch,
        pack=pack,
        forward_only=True,
        with_entropy=with_entropy,
        topk=topk,
        topk_ids=topk_ids,
        response_len=t_resp,
        attention=attention,
        logprobs_impl=logprobs_impl,
        temperature=temperature,
        routed=routed,
    )
    dev = platform.device()
    k = topk_ids.shape[-1] if topk_ids is not None else topk
    lengths = torch.tensor([len(s) - r for s, r in zip(sequences, response_starts, strict=True)])
    mask = (torch.arange(t_resp)[None, :] < lengths[:, None]).to(dev)
    fields = {"logprobs": ((n, t_resp), torch.float32)}
    if with_entropy:
        fields["entropy"] = ((n, t_resp), torch.float32)
    if k > 0:
        fields["topk_ids"] = ((n, t_resp, k), torch.int64)
        fields["topk_logprobs"] = ((n, t_resp, k + 1), torch.float32)
    result = {
        name: torch.zeros(shape, dtype=dt, device=dev) for name, (shape, dt) in fields.items()
    }
    for outs in reduced:  # only the last stage has any
        for name, t in result.items():
            t[outs["rollout_index"]] = outs[name].to(dev)
    for t in result.values():
        _broadcast_from_last_stage(t)
    if k > 0:
        result["topk_entropy"] = support_entropy(result["topk_logprobs"]) * mask
    return ResponseLogprobs(mask=mask, **result)


def student_teacher_logprobs(
    model_chunks: Sequence[torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    teacher_prefixes: Sequence[Sequence[int] | None],
    *,
    teacher_chunks: Sequence[torch.nn.Module] | None = None,
    token_budget: int,
    rows_per_microbatch: int = 1,
    with_entropy: bool = True,
    topk: int = 0,
    attention: AttentionLayout = "auto",
    logprobs_impl: LogprobsImpl = "auto",
    temperature: float = 1.0,
) -> tuple[ResponseLogprobs, ResponseLogprobs]:
    """Student and teacher log-probs of every rollout's response tokens, aligned `[B, T_resp]`.

    Student sequence: `prompts[i] + responses[i]`. Teacher sequence: `teacher_prefixes[i] +
    responses[i]` where the prefix is the teacher context + prompt (from the data package's
    teacher-context builder); None = no teacher view for this rollout (its teacher mask row is
    all False). Both passes run without grad; the teacher uses `teacher_chunks` (a snapshot / EMA
    model) or, by default, the student's weights (then an empty teacher context, prefix ==
    prompt, reuses the student's results exactly instead of a second forward). Column t of both
    outputs is response token t, so `teacher.logprobs - student.logprobs` is the per-token Delta.
    With `topk` > 0 the student pass picks each position's top-k support and the teacher is
    evaluated on that same support (`topk_logprobs` `[B, T, K+1]` in both, tail bucket last).
    """
    n = len(responses)
    if not len(prompts) == len(teacher_prefixes) == n:
        raise ValueError(
            f"{len(prompts)} prompts, {len(responses)} responses and {len(teacher_prefixes)} "
            "teacher prefixes: one of each per rollout (None for no teacher view)"
        )
    t_resp = max((len(r) for r in responses), default=0)
    kw = dict(
        token_budget=token_budget,
        rows_per_microbatch=rows_per_microbatch,
        with_entropy=with_entropy,
        response_len=t_resp,
        attention=attention,
        logprobs_impl=logprobs_impl,
        temperature=temperature,
    )
    student = compute_response_logprobs(
        model_chunks,
        [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)],
        [len(p) for p in prompts],
        topk=topk,
        **kw,
    )
    has_teacher = [i for i, p in enumerate(teacher_prefixes) if p is not None]
    teacher = ResponseLogprobs(
        logprobs=torch.zeros_like(student.logprobs),
        mask=torch.zeros_like(student.mask),
        entropy=None if student.entropy is None else torch.zeros_like(student.entropy),
        topk_ids=student.topk_ids,
        topk_logprobs=None if topk == 0 else torch.zeros_like(student.topk_logprobs),
        topk_entropy=None if topk == 0 else torch.zeros_like(student.topk_entropy),
    )
    fields = ("logprobs", "mask", "entropy", "topk_logprobs", "topk_entropy")
    if teacher_chunks is None:
        # Empty teacher context with the student's own weights: the teacher view *is* the
        # student view - copy it (exact, and no second forward).
        same = [i for i in has_teacher if list(teacher_prefixes[i]) == list(prompts[i])]
        if same:
            idx = torch.tensor(same, device=student.mask.device)
            for name in fields:
                if getattr(teacher, name) is not None:
                    getattr(teacher, name)[idx] = getattr(student, name)[idx]
            has_teacher = [i for i in has_teacher if i not in set(same)]
    if not has_teacher:
        return student, teacher
    sub = compute_response_logprobs(
        teacher_chunks if teacher_chunks is not None else model_chunks,
        [list(teacher_prefixes[i]) + list(responses[i]) for i in has_teacher],
        [len(teacher_prefixes[i]) for i in has_teacher],
        topk_ids=None if topk == 0 else student.topk_ids[has_teacher],
        **kw,
    )
    idx = torch.tensor(has_teacher, device=student.mask.device)
    for name in fields:
        dst = getattr(teacher, name)
        if dst is not None:
            dst[idx] = getattr(sub, name)
    return student, teacher
