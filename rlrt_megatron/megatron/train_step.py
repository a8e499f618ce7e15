"""The Megatron policy the trainer drives: model chunks, DDP, distributed optimizer, schedule,
token-budget micro-batches, log-prob forwards and the PPO update through `forward_backward_func`.

Sequences are `Seq(input_ids, resp_start, resp_len)`: the response tokens are
`input_ids[resp_start + 1 : resp_start + 1 + resp_len]`, predicted by the logits at positions
`resp_start ... resp_start + resp_len - 1`. The same response under a different prefix (the
teacher view) is just another `Seq`. Rows are right-padded; the causal mask makes padding after a
row harmless. Only response positions reach the log-prob code (the LM head output of the prompt
positions is never turned into log-probs).

Micro-batching: all micro-batches of one call share one `[b, T]` shape (pipeline stages exchange
fixed-shape activations), `T` = the longest row of the call, `b = max(1, token_budget // T)`;
the last micro-batch is filled with empty rows (mask 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlrt_megatron import platform
from rlrt_megatron.megatron.logprobs import vocab_parallel_logprobs, vocab_parallel_topk_logprobs
from rlrt_megatron.megatron.parallel import forward_backward, unwrap_model, wrap_with_ddp


@dataclass(frozen=True)
class Seq:
    """One row: tokens and where its response sits (see module docstring)."""

    input_ids: list[int]
    resp_start: int
    resp_len: int


def pack_microbatches(
    rows: Sequence[int], seqs: Sequence[Seq], token_budget: int, pad_id: int
) -> tuple[list[dict[str, Any]], int]:
    """Rows -> same-shape micro-batches within `token_budget` tokens each; returns (mbs, b)."""
    seq_len = max(len(seqs[r].input_ids) for r in rows)
    b = max(1, token_budget // seq_len)
    mbs = []
    for i in range(0, len(rows), b):
        chunk = list(rows[i : i + b])
        ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
        starts = torch.zeros(b, dtype=torch.long)
        lens = torch.zeros(b, dtype=torch.long)
        for j, r in enumerate(chunk):
            s = seqs[r]
            ids[j, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
            starts[j], lens[j] = s.resp_start, s.resp_len
        mbs.append(
            {
                "input_ids": ids,
                "resp_start": starts,
                "resp_len": lens,
                "rows": chunk,
                "n": len(chunk),
            }
        )
    return mbs, b


def response_positions(
    starts: torch.Tensor, lens: torch.Tensor, width: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit positions `[b, width]` of each row's response tokens and their validity mask."""
    ar = torch.arange(width, device=starts.device)
    pos = (starts[:, None] + ar[None, :]).clamp(max=seq_len - 2)
    valid = ar[None, :] < lens[:, None]
    return pos, valid


def gather_response(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits `[b, width, V/tp]` at the response positions, target ids `[b, width]`, mask."""
    pos, valid = response_positions(starts, lens, width, input_ids.shape[1])
    idx = pos[..., None].expand(-1, -1, logits.shape[-1])
    resp_logits = torch.gather(logits, 1, idx)
    targets = torch.gather(input_ids, 1, pos + 1) * valid
    return resp_logits, targets, valid


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
    ) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from rlrt_megatron.megatron.model import build_model, true_vocab_size

        self.hf_config = hf_config
        if (
            use_distributed_optimizer
            and platform.is_cpu_mode()
            and not getattr(platform, "DISTRIBUTED_OPTIMIZER_ON_CPU", False)
        ):
            # megatron's DistributedOptimizer accepts only `torch.cuda.*Tensor` parameters
            # (`param.type()` checks); until platform.py shims that, CPU runs use the plain
            # Megatron optimizer (same math, optimizer state replicated over DP ranks).
            use_distributed_optimizer = False
        self.use_distributed_optimizer = use_distributed_optimizer
        self.tp, self.pp, self.spec, self.params_dtype = tp, pp, spec, params_dtype
        chunks = build_model(hf_config, tp=tp, pp=pp, spec=spec, params_dtype=params_dtype)
        self.true_vocab = true_vocab_size(chunks[0])
        if sample_vocab_size is not None:
            # ids the rollout engine can never sample (beyond the tokenizer) must not carry
            # probability here either, or training and sampling distributions drift apart
            self.true_vocab = min(self.true_vocab, int(sample_vocab_size))
        self.model = wrap_with_ddp(chunks, use_distributed_optimizer=use_distributed_optimizer)
        bf16 = params_dtype == torch.bfloat16
        with cpu_tensor_type_names():
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

    # ---- model views ------------------------------------------------------------------------
    @property
    def chunks(self) -> list[torch.nn.Module]:
        """The unwrapped GPTModel chunks (no DDP)."""
        return [unwrap_model(m) for m in self.model]

    def make_teacher_copy(self) -> list[torch.nn.Module]:
        """A second set of weights (the RLSD snapshot / SDPO EMA teacher): freshly built chunks
        (same TP/PP sharding; a deepcopy cannot copy process groups) holding a copy of the
        policy's weights, frozen. Memory: one more copy of this rank's parameter shards."""
        from rlrt_megatron.megatron.model import build_model
        from rlrt_megatron.trainer.checkpoint import rng_state, set_rng_state

        state = rng_state()  # building must not move the RNG streams of the run
        teacher = build_model(
            self.hf_config, tp=self.tp, pp=self.pp, spec=self.spec, params_dtype=self.params_dtype
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

    # ---- forward only: log-probs of response tokens -----------------------------------------
    @torch.no_grad()
    def logprobs(
        self,
        seqs: Sequence[Seq],
        rows: Sequence[int],
        width: int,
        token_budget: int,
        pad_id: int,
        *,
        model: Sequence[torch.nn.Module] | None = None,
        with_entropy: bool = False,
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Per row of `rows`: `logprobs` [width] (and `entropy`) of its response tokens.

        Runs through the pipeline schedule (forward only); results are broadcast from the last
        stage so every rank of the model-parallel group returns them.
        """
        chunks = list(model) if model is not None else self.model
        for c in chunks:
            c.eval()
        out: dict[int, dict[str, torch.Tensor]] = {}
        if rows:
            mbs, _ = pack_microbatches(rows, seqs, token_budget, pad_id)

            def loss_fn(batch: dict, logits: torch.Tensor) -> tuple:
                resp, tgt, valid = gather_response(
                    logits, batch["input_ids"], batch["resp_start"], batch["resp_len"], width
                )
                res = vocab_parallel_logprobs(
                    resp, tgt, self.tp_group, with_entropy=with_entropy,
                    true_vocab_size=self.true_vocab,
                )  # fmt: skip
                lp, ent = res if with_entropy else (res, None)
                lp = lp * valid
                reduced = {"rows": batch["rows"], "logprobs": lp[: batch["n"]].float()}
                if ent is not None:
                    reduced["entropy"] = (ent * valid)[: batch["n"]].float()
                return torch.zeros((), device=logits.device), reduced

            results = forward_backward(chunks, mbs, loss_fn, forward_only=True)
            for r in results:
                for j, row in enumerate(r["rows"]):
                    out[row] = {k: v[j].cpu() for k, v in r.items() if k != "rows"}
        for c in chunks:
            c.train()
        if self.pp > 1:
            box = [out]
            dist.broadcast_object_list(box, src=self.last_stage_rank, group=self.pp_group)
            out = box[0]
        return out

    # ---- one optimizer step on a mini-batch -------------------------------------------------
    def train_minibatch(
        self,
        seqs: Sequence[Seq],
        rows: Sequence[int],
        width: int,
        token_budget: int,
        pad_id: int,
        loss_of: Callable[..., tuple[torch.Tensor, dict[str, float]]],
        *,
        teacher: Sequence[torch.nn.Module] | None = None,
        teacher_seqs: Sequence[Seq] | None = None,
        topk: int = 0,
    ) -> dict[str, float]:
        """Forward/backward this rank's `rows` of one mini-batch, then one optimizer step.

        `loss_of(logprobs [n, width], rows, topk)` returns `(loss, metrics)` with the
        mini-batch normalisation already applied (the algorithm's `loss`). With `topk > 0`
        the teacher's logits on `teacher_seqs` are computed per micro-batch (no grad) and
        `topk` = `(student_topk_logprobs, teacher_topk_logprobs, teacher_entropy)` at the
        student's top-k ids; this needs pp == 1.
        """
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        metric_sums: dict[str, float] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=platform.device())
        n_mb = 0
        if rows:
            mbs, b = pack_microbatches(rows, seqs, token_budget, pad_id)
            n_mb = len(mbs)
            if topk:
                if self.pp != 1:
                    raise NotImplementedError("top-k distillation (SDPO/SRPO) needs parallel.pp=1")
                # one teacher micro-batch per student micro-batch, same rows
                tmbs = [
                    pack_microbatches(
                        mb["rows"],
                        teacher_seqs,
                        len(mb["rows"]) * max(len(teacher_seqs[r].input_ids) for r in mb["rows"]),
                        pad_id,
                    )[0][0]
                    for mb in mbs
                ]
                for mb, tmb in zip(mbs, tmbs, strict=True):
                    mb["teacher"] = tmb

            def loss_fn(batch: dict, logits: torch.Tensor) -> tuple:
                n = batch["n"]
                resp, tgt, valid = gather_response(
                    logits, batch["input_ids"], batch["resp_start"], batch["resp_len"], width
                )
                resp, tgt, valid = resp[:n], tgt[:n], valid[:n]
                lp = vocab_parallel_logprobs(
                    resp, tgt, self.tp_group, true_vocab_size=self.true_vocab
                )
                lp = lp * valid
                tk = None
                if topk:
                    tb_ = batch["teacher"]
                    with torch.no_grad():
                        t_logits = teacher[0](
                            tb_["input_ids"].to(logits.device),
                            torch.arange(tb_["input_ids"].shape[1], device=logits.device).expand_as(
                                tb_["input_ids"]
                            ),
                            attention_mask=None,
                        )
                        t_resp, _, _ = gather_response(
                            t_logits, tb_["input_ids"].to(logits.device),
                            tb_["resp_start"].to(logits.device), tb_["resp_len"].to(logits.device),
                            width,
                        )  # fmt: skip
                    res = vocab_parallel_topk_logprobs(
                        resp, t_resp[:n], k=topk, group=self.tp_group,
                        true_vocab_size=self.true_vocab,
                    )  # fmt: skip
                    tk = (res.student_logprobs, res.teacher_logprobs, res.teacher_entropy)
                loss, metrics = loss_of(lp, batch["rows"], tk)
                # the schedule divides by the number of micro-batches; the algorithm's loss is
                # already normalised over the whole mini-batch
                return loss * n_mb, {"metrics": metrics, "loss": loss.detach()}

            outs = forward_backward(self.model, mbs, loss_fn)
            for o in outs:
                for k, v in o["metrics"].items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                loss_sum += o["loss"].double()
        else:  # a rank without rows still joins the collectives of the step
            raise ValueError("every data-parallel rank needs at least one row per mini-batch")
        with cpu_tensor_type_names():
            ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        if self.pp > 1:  # only the last stage saw the loss function's metrics
            metric_sums = broadcast_object(metric_sums, self.last_stage_rank, self.pp_group)
        out = {k: v / max(n_mb, 1) for k, v in metric_sums.items()}
        # the mini-batch loss: micro-batch losses are already normalised by the whole
        # mini-batch, so they add up (over micro-batches here, over DP ranks below)
        if self.dp_size > 1:
            dist.all_reduce(loss_sum, group=self.dp_group)
        if self.pp > 1:
            dist.broadcast(loss_sum, src=self.last_stage_rank, group=self.pp_group)
        out["loss"] = float(loss_sum) * (1.0 if self.dp_size == 1 else 1.0 / self.dp_size)
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        out["update_ok"] = float(bool(ok))
        out["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return out


@contextmanager
def cpu_tensor_type_names() -> Iterator[None]:
    """TEMPORARY CPU shim (belongs in platform.py): megatron's optimizers check
    `param.type() == "torch.cuda.FloatTensor"` (optimizer.py, distrib_optimizer.py,
    clip_grads.py); on CPU report CPU tensors under their CUDA type names while building and
    stepping the optimizer. A no-op with a GPU or once platform installs the shim."""
    if not platform.is_cpu_mode() or getattr(platform, "TENSOR_TYPE_SHIM", False):
        yield
        return
    orig = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any):
        if dtype is None and not kw and self.device.type == "cpu":
            return orig(self).replace("torch.", "torch.cuda.", 1)
        return orig(self, dtype, non_blocking, **kw)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = orig  # type: ignore[method-assign]


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """`obj` from global rank `src` on every rank (pickled)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def device() -> torch.device:
    return platform.device()
