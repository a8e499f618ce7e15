"""The Megatron policy the trainer drives: model chunks, DDP, distributed optimizer, schedule,
token-budget micro-batches, log-prob forwards and the PPO update through `forward_backward_func`.

The forwards are `megatron/forward.py`'s: rollouts packed into micro-batches of at most
`train.max_tokens_per_microbatch` tokens (raised to the longest sequence when one is longer),
the LM head applied only at response positions, PP-aware through Megatron's schedules. The
`logprobs` phase gets student and teacher views of every rollout (teacher = the policy itself
or the snapshot / EMA chunks of `make_teacher_copy`); the update back-propagates the
algorithm's loss per micro-batch, then takes one optimizer step per PPO mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from rlrt_megatron import platform
from rlrt_megatron.megatron.parallel import unwrap_model, wrap_with_ddp


class Policy:
    """Model chunks + DDP + Megatron optimizer + LR schedule for one rank.

    Args:
        hf_config: the HF config (object or dict) to build the GPTModel from.
        tp, pp: model-parallel sizes (after `platform.init_distributed`).
        optim: `rlrt_megatron.config.OptimizerConfig`; `total_steps` for the cosine schedule.
        use_distributed_optimizer: shard optimizer state over data parallel ranks.
        spec, params_dtype: layer spec and dtype.
        sample_vocab_size: ids >= this (e.g. `len(tokenizer)`, the local engine's sampling
            vocabulary) are excluded from log-probs and entropy like Megatron's vocab padding.
        fp8: `rlrt_megatron.megatron.te.FP8Config` (or None = off); its TransformerConfig
            fields (`te.fp8_transformer_kwargs`) go to `build_model` (policy and teacher).
        logprobs_impl: `model.logprobs_impl`, the LM head + log-probs implementation of every
            forward (`megatron/lm_head.py`).
        temperature: `rollout.temperature`; every forward (student, teacher, entropy, top-k,
            update) computes softmax(logits / T), the engine's sampling distribution (see
            `megatron/forward.py`).
        moe: `megatron.moe.provider.MoESettings` of a MoE model (None for a dense one).
        sequence_parallel: `parallel.sequence_parallel` (tp > 1; megatron trains MoE layers at
            tp > 1 only with it), for the policy and its teacher copies.
    """

    def __init__(
        self,
        hf_config: Any,
        *,
        tp: int,
        pp: int,
        optim: Any,
        total_steps: int,
        use_distributed_optimizer: bool = True,
        spec: str = "local",
        params_dtype: torch.dtype = torch.float32,
        sample_vocab_size: int | None = None,
        fp8: Any = None,
        logprobs_impl: str = "auto",
        temperature: float = 1.0,
        moe: Any = None,
        sequence_parallel: bool = False,
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from rlrt_megatron.megatron.model import build_model, true_vocab_size
        from rlrt_megatron.megatron.moe.routing import RouterStats, routers
        from rlrt_megatron.megatron.te import fp8_transformer_kwargs

        self.hf_config = hf_config
        self.use_distributed_optimizer = use_distributed_optimizer
        self.tp, self.pp, self.spec, self.params_dtype = tp, pp, spec, params_dtype
        self.logprobs_impl = logprobs_impl
        self.last_nonfinite: str | None = None  # what was not finite in the last mini-batch
        self.temperature = float(temperature)
        self.model_kwargs = {
            **fp8_transformer_kwargs(fp8, spec), "moe": moe,  # moe: MoESettings
            "sequence_parallel": sequence_parallel,
        }  # fmt: skip
        chunks = build_model(
            hf_config, tp=tp, pp=pp, spec=spec, params_dtype=params_dtype, **self.model_kwargs
        )
        self.true_vocab = true_vocab_size(chunks[0])
        if sample_vocab_size is not None:
            # ids the rollout engine can never sample (beyond the tokenizer) must not carry
            # probability here either, or training and sampling distributions drift apart
            self.true_vocab = min(self.true_vocab, int(sample_vocab_size))
        self.model = wrap_with_ddp(chunks, use_distributed_optimizer=use_distributed_optimizer)
        bf16 = params_dtype == torch.bfloat16
        self.optimizer = self._make_optimizer(optim, bf16, use_distributed_optimizer)
        decay_steps = max(1, total_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr if optim.schedule == "cosine" else optim.lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(decay_steps, optim.warmup_steps + 1),
            lr_decay_style="cosine" if optim.schedule == "cosine" else "constant",
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.last_stage_rank = ps.get_pipeline_model_parallel_last_rank()
        sp = self.tp_group if sequence_parallel else None  # TP ranks route slices of the tokens
        self.router_stats = RouterStats(chunks, self.dp_group, sp) if routers(chunks) else None

    def _make_optimizer(self, optim: Any, bf16: bool, distributed: bool) -> Any:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        return get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                bf16=bf16,
                params_dtype=self.params_dtype,
                use_distributed_optimizer=distributed,
            ),
            self.model,
        )

    def sync_main_params(self) -> None:
        """Call after writing into the model's weights from outside the optimizer (loading a
        converted checkpoint): with bf16 params Megatron's optimizer keeps fp32 main params,
        copied from the model when the optimizer was built (the random init); without the
        refresh the first optimizer step writes that init back into the model."""
        self.optimizer.reload_model_params()

    # ---- model views ------------------------------------------------------------------------
    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The unwrapped GPTModel chunks (no DDP)."""
        return [unwrap_model(m) for m in self.model]

    def make_teacher_copy(self, dtype: torch.dtype | None = None) -> list[torch.nn.Module]:
        """A second set of weights (the RLSD snapshot / SDPO EMA teacher): freshly built chunks
        (same TP/PP sharding; a deepcopy cannot copy process groups) holding a copy of the
        policy's weights, frozen. Memory: one more copy of this rank's parameter shards.

        `dtype` (default: the policy's): an EMA teacher needs fp32 under a bf16 policy, since
        `rate * (student - teacher)` of one step is mostly below bf16's resolution and would be
        rounded away (measured: 91% of bf16 EMA entries never moved in 100 steps)."""
        from rlrt_megatron.megatron.model import build_model
        from rlrt_megatron.megatron.rng import rng_state, set_rng_state

        state = rng_state()  # building must not move the RNG streams of the run
        teacher = build_model(
            self.hf_config,
            tp=self.tp,
            pp=self.pp,
            spec=self.spec,
            params_dtype=dtype or self.params_dtype,
            **self.model_kwargs,
        )
        set_rng_state(state)
        for t in teacher:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)
        self.copy_into(teacher)
        return teacher

    @torch.no_grad()
    def copy_into(self, teacher: Sequence[torch.nn.Module]) -> None:
        for t, s in zip(teacher, self.chunks, strict=True):
            for pt, ps_ in zip(t.parameters(), s.parameters(), strict=True):
                pt.copy_(ps_)

    @torch.no_grad()
    def ema_into(self, teacher: Sequence[torch.nn.Module], rate: float) -> None:
        """theta_T <- (1 - rate) theta_T + rate theta."""
        for t, s in zip(teacher, self.chunks, strict=True):
            for pt, ps_ in zip(t.parameters(), s.parameters(), strict=True):
                pt.lerp_(ps_.to(pt.dtype), rate)

    # ---- forward only: student / teacher log-probs of response tokens ----------------------
    @contextmanager
    def _sampling_vocab(self, chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
        """TEMPORARY (until `megatron/forward.py` takes a vocabulary limit): the forward code
        reads the chunks' `true_vocab_size`; narrow it to the engine's sampling vocabulary for
        the call (the converter needs the real value, so it is restored afterwards)."""
        mods = [unwrap_model(c) for c in chunks]
        old = [m.true_vocab_size for m in mods]
        for m in mods:
            m.true_vocab_size = min(m.true_vocab_size, self.true_vocab)
        try:
            yield
        finally:
            for m, v in zip(mods, old, strict=True):
                m.true_vocab_size = v

    def _layout(self, longest: int, token_budget: int) -> tuple[int, int]:
        """(tokens per packed row, rows per micro-batch) for `megatron/forward.py`.

        Transformer Engine (`spec=te`) and the SDPA spec (`spec=torch`) attend within packed
        sequences (thd): one long row of up to `token_budget` tokens. The local spec uses a dense
        block-causal mask, quadratic in the row length: rows as long as the longest sequence,
        `token_budget // longest` rows per micro-batch (the unpacked cost, 20-30x faster on the
        tiny demo than 2k-token rows). The layout is read from the model (`spec=auto` resolves
        when the model is built)."""
        from rlrt_megatron.megatron.forward import _attention_layout

        if _attention_layout(self.model[0], "auto") == "thd":
            return max(token_budget, longest), 1
        return longest, max(1, token_budget // longest)

    @torch.no_grad()
    def response_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        teacher_prefixes: Sequence[Sequence[int] | None],
        *,
        token_budget: int,
        teacher: Sequence[torch.nn.Module] | None = None,
        topk: int = 0,
        routed: Sequence[torch.Tensor] | None = None,
    ) -> tuple[Any, Any]:
        """Student and teacher `ResponseLogprobs` (`megatron/forward.py`) of these rollouts, on
        every rank of the model-parallel group. `teacher_prefixes[i]` = teacher context + prompt
        (None: no teacher view); `teacher` = separate teacher chunks (None: the policy).
        `routed`: the engine's experts per rollout (MoE routing replay), replayed in the student
        forward only: the teacher's context is one the engine never saw, its routers route."""
        from rlrt_megatron.megatron.forward import ResponseLogprobs, compute_response_logprobs

        chunks = list(self.model) + list(teacher or [])
        for c in chunks:
            c.eval()
        t_resp = max(len(r) for r in responses)
        has = [i for i, t in enumerate(teacher_prefixes) if t is not None]

        def run(model: Sequence[torch.nn.Module], seqs: list, starts: list, **kw: Any) -> Any:
            # each pass gets its own layout: the student's forward must not depend on the
            # teacher's lengths (RLRT with alpha=0 reproduces GRPO bit for bit)
            row_tokens, rows_per_mb = self._layout(max(len(x) for x in seqs), token_budget)
            return compute_response_logprobs(
                model, seqs, starts, token_budget=row_tokens, rows_per_microbatch=rows_per_mb,
                with_entropy=True, response_len=t_resp, logprobs_impl=self.logprobs_impl,
                temperature=self.temperature, **kw,
            )  # fmt: skip

        try:
            with self._sampling_vocab(chunks):
                student = run(
                    self.model,
                    [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)],
                    [len(p) for p in prompts],
                    topk=topk,
                    routed=routed,
                )
                teacher_out = ResponseLogprobs(
                    logprobs=torch.zeros_like(student.logprobs),
                    mask=torch.zeros_like(student.mask),
                    entropy=torch.zeros_like(student.entropy),
                    topk_ids=student.topk_ids,
                    topk_logprobs=None if not topk else torch.zeros_like(student.topk_logprobs),
                )
                if has:
                    sub = run(
                        teacher if teacher is not None else self.model,
                        [list(teacher_prefixes[i]) + list(responses[i]) for i in has],
                        [len(teacher_prefixes[i]) for i in has],
                        topk_ids=None if not topk else student.topk_ids[has],
                    )
                    idx = torch.tensor(has, device=student.mask.device)
                    for name in ("logprobs", "mask", "entropy", "topk_logprobs"):
                        dst = getattr(teacher_out, name)
                        if dst is not None:
                            dst[idx] = getattr(sub, name)
                return student, teacher_out
        finally:
            for c in self.model:
                c.train()

    # ---- one optimizer step on a mini-batch -------------------------------------------------
    def train_minibatch(
        self,
        sequences: Sequence[Sequence[int]],
        response_starts: Sequence[int],
        rows: Sequence[int],
        width: int,
        token_budget: int,
        loss_of: Callable[..., tuple[torch.Tensor, dict[str, Any]]],
        *,
        topk_ids: torch.Tensor | None = None,
        teacher_topk: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        routed: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Forward/backward this rank's rollouts of one mini-batch, then one optimizer step.

        `sequences[i]` (prompt + response of global row `rows[i]`, response from
        `response_starts[i]`) are packed by `megatron/forward.py`; per micro-batch
        `loss_of(logprobs [n, width], global_rows [n] (an int64 tensor on the device), topk)`
        returns `(loss, metrics)` with the mini-batch normalisation already applied (the
        algorithm's `loss`; metrics as 0-d tensors or floats). For SDPO/SRPO, `topk_ids`
        `[len(rows), width, K]` fixes the support (the pre-update student's top-k, from the
        logprobs phase) and `teacher_topk` = (teacher log-probs on it `[.., K+1]`, teacher
        entropy `[.., width]` or None); `topk` then is
        `(student_topk_logprobs, teacher_topk_logprobs, teacher_entropy)`. `routed`: the
        engine's experts per sequence (MoE routing replay; `megatron/forward.py`).

        No device->host sync inside Megatron's schedule (`tests/unit/test_host_syncs.py`): the
        rows are a device tensor, the algorithm's value checks are skipped there (its inputs were
        validated by `prepare`, the teacher top-k here, the model's log-probs are checked for
        NaN/inf on the device and read once after the schedule), and the metrics stay tensors
        until one read per mini-batch. Returned metrics are means over the micro-batches,
        averaged on the last pipeline stage (where the loss runs) and broadcast from there.
        """
        from rlrt_megatron.algorithms import values_checked
        from rlrt_megatron.megatron.forward import forward_backward_responses

        if not rows:
            raise ValueError("every data-parallel rank needs at least one row per mini-batch")
        dev = platform.device()
        if teacher_topk is not None:  # validated once per mini-batch, not per micro-batch
            t_lp = teacher_topk[0]
            bad = int((torch.isnan(t_lp) | (t_lp == float("inf"))).sum())
            if bad:
                raise ValueError(
                    f"train_minibatch: the teacher's top-k log-probs {tuple(t_lp.shape)} hold "
                    f"{bad} NaN/+inf value(s): check the teacher forward of the logprobs phase"
                )
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        row_tokens, rows_per_mb = self._layout(max(len(s) for s in sequences), token_budget)
        global_rows = torch.tensor(list(rows), dtype=torch.int64, device=dev)
        nonfinite = torch.zeros((), dtype=torch.float64, device=dev)

        def loss_fn(mb: Any, outs: dict[str, torch.Tensor]) -> tuple:
            idx = outs["rollout_index"]
            tk = None
            if topk_ids is not None and teacher_topk is not None:
                t_lp, t_ent = teacher_topk
                tk = (
                    outs["topk_logprobs"],
                    t_lp.to(idx.device)[idx],
                    None if t_ent is None else t_ent.to(idx.device)[idx],
                )
            lp = outs["logprobs"]
            nonfinite.add_((~torch.isfinite(lp.detach())).sum())  # read after the schedule
            with values_checked():
                loss, metrics = loss_of(lp, global_rows[idx], tk)
            # the schedule divides by the number of micro-batches; the algorithm's loss is
            # already normalised over the whole mini-batch (each mini-batch is packed once, in
            # forward_backward_responses, which reports the count)
            n_mb = outs["num_microbatches"]
            return loss * n_mb, {"metrics": metrics, "loss": loss.detach().clone()}

        # the backward runs inside the schedule: strict there under train.deterministic
        with self._sampling_vocab(self.model), platform.strict_determinism():
            outs = forward_backward_responses(
                self.model,
                sequences,
                response_starts,
                loss_fn,
                token_budget=row_tokens,
                rows_per_microbatch=rows_per_mb,
                response_len=width,
                topk_ids=topk_ids,
                logprobs_impl=self.logprobs_impl,
                temperature=self.temperature,
                routed=routed,
            )
        out, bad = self._reduce_metrics(outs, nonfinite)
        # a non-finite log-prob, loss or gradient on any rank: no optimizer step anywhere (the
        # weights stay finite); the trainer skips the mini-batch or stops (train.on_nonfinite)
        loss_t = torch.tensor(out["loss"], dtype=torch.float64, device=dev)
        self.last_nonfinite = nonfinite_in(loss_t, self.model)
        if bad > 0:
            self.last_nonfinite = (
                f"log-probs of the policy ({int(bad)} NaN/inf value(s) on all data-parallel "
                "ranks: the model diverged, lower optimizer.lr, or its weights were loaded broken)"
            )
        if self.last_nonfinite is None:
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(1)
        else:
            ok, grad_norm = False, None
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        out["update_ok"] = float(bool(ok))
        out["nonfinite_skipped"] = float(self.last_nonfinite is not None)
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.router_stats is not None:  # MoE: moe/aux_loss, per-layer expert load
            out.update(self.router_stats.metrics())
        return out

    def _reduce_metrics(
        self, outs: list, nonfinite: torch.Tensor
    ) -> tuple[dict[str, float], float]:
        """The mini-batch's metrics from the schedule's per-micro-batch outputs, on every rank.

        The loss is the sum of the micro-batch losses (each normalised by the whole mini-batch)
        over micro-batches and data-parallel ranks; every other metric is its mean over this
        rank's micro-batches, computed on the last pipeline stage (the only one with outputs)
        and broadcast over the pipeline group. One host read per mini-batch. Also returns how
        many of the model's log-probs were NaN/inf, summed over data-parallel ranks."""
        dev = nonfinite.device
        keys = sorted({k for o in outs for k in o["metrics"]})
        n_mb = max(len(outs), 1)
        means = [
            sum(_as_f64(o["metrics"][k], dev) for o in outs if k in o["metrics"]) / n_mb
            for k in keys
        ]
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        loss_sum = sum((o["loss"].double() for o in outs), zero)
        summed = torch.stack([loss_sum, nonfinite])  # summed over data-parallel ranks
        if self.dp_size > 1:
            dist.all_reduce(summed, group=self.dp_group)
        values = torch.stack([summed[0] / self.dp_size, summed[1], *means]).tolist()
        got = dict(zip(["loss", "nonfinite", *keys], values, strict=True))
        if self.pp > 1:
            got = broadcast_object(got, self.last_stage_rank, self.pp_group)
        bad = got.pop("nonfinite")
        return got, bad


def _as_f64(v: Any, dev: torch.device) -> torch.Tensor:
    """A metric (0-d tensor or python number) as a float64 tensor on `dev`, no host sync."""
    if torch.is_tensor(v):
        return v.detach().to(device=dev, dtype=torch.float64)
    return torch.tensor(float(v), dtype=torch.float64, device=dev)


def nonfinite_in(loss: torch.Tensor, model: Sequence[Any]) -> str | None:
    """None when `loss` and every gradient of `model` are finite on every rank, else what was
    not, as "loss" or "gradient of <parameter>" (the first such on the lowest failing rank).
    One all-reduce of a flag; the names are looked up only on failure."""
    flags = [torch.isfinite(loss).all()]
    grads = [
        (n, getattr(p, "main_grad", p.grad))
        for i, m in enumerate(model)
        for n, p in unwrap_model(m).named_parameters(prefix=f"chunk{i}" if len(model) > 1 else "")
    ]
    flags += [torch.isfinite(g).all() for _, g in grads if g is not None]
    bad = (~torch.stack(flags).all()).to(torch.int64).reshape(1)
    where = torch.zeros(1, dtype=torch.int64, device=bad.device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not int(bad):
        return None
    what = "loss" if not bool(flags[0]) else None
    for n, g in grads:
        if what is None and g is not None and not bool(torch.isfinite(g).all()):
            what = f"gradient of {n}"
    if dist.is_initialized() and dist.get_world_size() > 1:  # the lowest rank that saw it names it
        where[0] = dist.get_rank() if what is not None else dist.get_world_size()
        dist.all_reduce(where, op=dist.ReduceOp.MIN)
        box = [what]
        dist.broadcast_object_list(box, src=int(where[0]))
        what = box[0]
    return what or "loss"


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """`obj` from global rank `src` on every rank (pickled)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
