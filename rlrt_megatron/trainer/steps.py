"""The bodies of the loop's phases (`trainer/train.py` shows the order; `trainer/setup.py`
builds the run).

State that lives across steps is a `Run`; a step's data is a `Batch` (`trainer/state.py`).
Rank 0 owns the rollout engine and the reward workers; what they produce is broadcast so every
rank builds the same `Batch`. Log-prob forwards are split over data-parallel ranks and
all-gathered; the update splits each PPO mini-batch over data-parallel ranks (DDP averages the
gradients).
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any

import torch
import torch.distributed as dist

from rlrt_megatron import platform
from rlrt_megatron.config import TrainConfig
from rlrt_megatron.trainer.checkpoint import layout_of
from rlrt_megatron.trainer.faults import (
    INJECT_ENV,
    check_nonfinite,
    describe_write_failure,
    injected,
    spoil_loss,
)
from rlrt_megatron.trainer.state import (
    ROLLOUT_QUEUE_FILE,
    Batch,
    Run,
    ragged_to_padded,
)
from rlrt_megatron.trainer.teacher import teacher_metrics, teacher_prefix_cap

# ---- phases -------------------------------------------------------------------------------


def _broadcast(obj: Any) -> Any:
    from rlrt_megatron.megatron.train_step import broadcast_object

    return broadcast_object(obj, src=0)


def rollout(run: Run, step: int) -> Batch:
    """Step `step`'s batch: G completions per prompt (seed = rollout.seed + step), sampled on
    rank 0 now, or taken from the asynchronous queue (sampled during the previous step)."""
    from rlrt_megatron.trainer import rollouts

    if run.rollouts is not None:
        idx, payload = run.rollouts.take(step)
    else:
        idx = run.sampler.next_indices()  # every rank advances its sampler identically
        payload = None
        if run.rank == 0:
            payload = rollouts.generate(run.engine, *rollouts.make_requests(run, step, idx))
    rows = [run.dataset[i] for i in idx]
    prompts, responses, texts, blp, finish, versions, *partial = _broadcast(payload)
    routed = rollouts.routed_experts(run.cfg, partial)  # MoE routing replay (pops them)
    if partial:  # partial rollouts: the finished groups, from any step's prompts
        token_versions, idx, info = partial
        rows = [run.dataset[i] for i in idx]
    else:  # every token has its rollout's version
        token_versions = [[v] * len(r) for v, r in zip(versions, responses, strict=True)]
        info = {}
    batch = Batch(rows, prompts, responses, texts, blp, finish, versions, token_versions)
    batch.sync_metrics = dict(info)
    batch.routed = routed
    return batch


def reward(run: Run, batch: Batch) -> None:
    """math-verify every completion against its reference answer (rank 0 workers)."""
    g = run.cfg.rollout.group_size
    payload = None
    if run.rank == 0:
        refs = [batch.rows[i // g].answer for i in range(len(batch.texts))]
        res = run.reward_fn(batch.texts, refs)
        payload = (list(res.scores), res.metrics())
    scores, info = _broadcast(payload)
    batch.rewards = torch.tensor(scores, dtype=torch.float32).to(
        platform.device(), non_blocking=True
    )
    batch.reward_info = info


def _build_views(run: Run, batch: Batch, step: int) -> None:
    """Per rollout: its prompt, its response (an empty one gets one masked pad token) and its
    teacher prefix (teacher context + prompt; None when the teacher forward skips the rollout).

    The teacher forward runs on the rows the algorithm uses (`algo.teacher_rows`: RLRT correct
    rollouts with a peer, SRPO incorrect ones, ...; `batch.has_teacher`) plus up to
    `teacher.probe_rows` rows it does not use but that have a context (`batch.teacher_probe`),
    so that Delta is measured on correct AND wrong rollouts every step (`delta/correct_mean`,
    `delta/wrong_mean`) at a small fixed cost. Teacher prompts longer than
    `teacher_prefix_cap(cfg)` tokens get no teacher."""
    from rlrt_megatron.data import build_teacher_contexts

    cfg, algo = run.cfg, run.algo
    g = cfg.rollout.group_size
    n = len(batch.responses)
    batch.row_prompts = [batch.prompts[i // g] for i in range(n)]
    batch.row_responses = [list(r) or [run.pad_id] for r in batch.responses]
    batch.width = max(len(r) for r in batch.row_responses)
    batch.teacher_prefixes = [None] * n
    has_ctx = [False] * n
    ctx: list = [None] * n
    if algo.needs_teacher and algo.teacher_context:
        ctx = build_teacher_contexts(
            [r.problem for r in batch.rows],
            batch.texts,
            batch.rewards.tolist(),
            g,
            mode=algo.teacher_context,
            references=[r.reference_text() for r in batch.rows],
            tokenizer=run.tokenizer,
            template=cfg.data.teacher_template,
            prompt_template=run.prompt_template,
            seed=cfg.train.seed * 100003 + step,
            max_prefix_tokens=teacher_prefix_cap(cfg),
        )
        has_ctx = [c is not None for c in ctx]
    dev = platform.device()
    rewards = batch.rewards.detach().cpu()
    used = algo.teacher_rows(rewards, torch.tensor(has_ctx, dtype=torch.bool)).tolist()
    spare = [i for i in range(n) if has_ctx[i] and not used[i]]
    k = min(len(spare), max(cfg.teacher.probe_rows, 0))
    probe = [False] * n
    for j in range(k):  # spread over the batch, deterministic
        probe[spare[j * len(spare) // k]] = True
    for i, c in enumerate(ctx):
        if c is not None and (used[i] or probe[i]):
            batch.teacher_prefixes[i] = list(c.token_ids)
    batch.teacher_used = used
    batch.has_teacher = torch.tensor(used, dtype=torch.bool).to(dev, non_blocking=True)
    batch.teacher_probe = torch.tensor(probe, dtype=torch.bool).to(dev, non_blocking=True)
    batch.mask = ragged_to_padded([[1.0] * len(r) for r in batch.responses], batch.width, dev)


def _rows_of(per_rollout: list | None, rows: list[int]) -> list | None:
    return None if per_rollout is None else [per_rollout[i] for i in rows]


def _pad(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """`[n, T, ...]` -> `[n, width, ...]` (zeros on the right), on the tensor's device."""
    if t is None:
        return None
    t = t.detach()
    if t.shape[1] == width:
        return t
    out = t.new_zeros((t.shape[0], width, *t.shape[2:]))
    out[:, : t.shape[1]] = t
    return out


def logprobs(run: Run, batch: Batch) -> None:
    """Student log pi_S (+ entropy) on every rollout and, where the algorithm asks, teacher
    log pi_T (+ entropy, + the teacher on the student's top-k support for SDPO/SRPO). Rollouts are
    split over data-parallel ranks and the results all-gathered."""
    _build_views(run, batch, run.step + 1)
    pol, algo = run.policy, run.algo
    n, w = len(batch.responses), batch.width
    mine = list(range(pol.dp_rank, n, pol.dp_size))
    wants_teacher = bool(algo.needs_teacher)
    student, teacher = pol.response_logprobs(
        [batch.row_prompts[i] for i in mine],
        [batch.row_responses[i] for i in mine],
        [batch.teacher_prefixes[i] if wants_teacher else None for i in mine],
        token_budget=run.cfg.train.max_tokens_per_microbatch,
        teacher=run.teacher if algo.teacher_weights != "current" else None,
        topk=int(getattr(algo, "needs_topk", 0) or 0),
        routed=_rows_of(batch.routed, mine),
    )
    part = {
        "logprobs": _pad(student.logprobs, w),
        "entropy": _pad(student.entropy, w),
        "teacher_logprobs": _pad(teacher.logprobs, w),
        "teacher_entropy": _pad(teacher.entropy, w),
        "topk_ids": _pad(student.topk_ids, w),
        "teacher_topk_logprobs": _pad(teacher.topk_logprobs, w),
    }
    full = {k: _gather_rows(v, n, pol) for k, v in part.items() if v is not None}
    batch.student_logprobs, batch.entropy = full["logprobs"], full["entropy"]
    batch.behavior = ragged_to_padded(batch.behavior_logprobs, w, batch.mask.device)
    _check_sync(run, batch)
    if run.cfg.train.recompute_old_logprobs:
        batch.old_logprobs = batch.student_logprobs
    else:
        batch.old_logprobs = batch.behavior
    if wants_teacher:
        has = (batch.has_teacher | batch.teacher_probe)[:, None]
        # rows without a teacher view hold the student's values (their weight is 1 anyway)
        batch.teacher_logprobs = torch.where(has, full["teacher_logprobs"], batch.student_logprobs)
        batch.teacher_entropy = torch.where(has, full["teacher_entropy"], batch.entropy)
    batch.topk_ids = full.get("topk_ids")
    batch.teacher_topk_logprobs = full.get("teacher_topk_logprobs")


def _check_sync(run: Run, batch: Batch) -> None:
    """The sync check of `trainer/rollouts.py` (raises SyncCheckError on a stale engine)."""
    from rlrt_megatron.trainer.rollouts import sync_check, unreplayed_probe

    step = run.step + 1
    probe = None
    if run.rollouts is not None:
        probe = _broadcast(run.rollouts.take_probe(step) if run.rank == 0 else None)
    own = _pad(unreplayed_probe(run, batch, probe), batch.width)  # MoE replay with SGLang
    batch.sync_metrics.update(sync_check(run, batch, step, probe, own))


def _gather_rows(t: torch.Tensor, n: int, pol: Any) -> torch.Tensor:
    """Rows `dp_rank::dp_size` of every data-parallel rank -> all `n` rows, on every rank.

    One tensor all-gather on the policy's device (NCCL on GPUs), each rank's part padded to
    `ceil(n / dp)` rows; no pickling and no host round trip."""
    if pol.dp_size == 1:
        return t
    per = -(-n // pol.dp_size)
    buf = t.new_zeros((per, *t.shape[1:]))
    buf[: t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in range(pol.dp_size)]
    dist.all_gather(parts, buf, group=pol.dp_group)
    out = t.new_zeros((n, *t.shape[1:]))
    for r, p in enumerate(parts):
        rows = len(range(r, n, pol.dp_size))
        out[r :: pol.dp_size] = p[:rows]
    return out


def advantages(run: Run, batch: Batch, step: int) -> Any:
    """Group advantages and the algorithm's token reshaping (`algo.prepare`)."""
    from rlrt_megatron.algorithms import AlgoBatch, dapo_keep_mask

    mask = batch.mask
    if getattr(run.algo, "dynamic_sampling", False):  # DAPO: groups with equal rewards drop out
        keep = dapo_keep_mask(batch.rewards, run.cfg.rollout.group_size)
        mask = mask * keep[:, None].to(mask.dtype)
    return run.algo.prepare(
        AlgoBatch(
            rewards=batch.rewards,
            group_size=run.cfg.rollout.group_size,
            mask=mask,
            old_logprobs=batch.old_logprobs,
            student_logprobs=batch.student_logprobs,
            teacher_logprobs=batch.teacher_logprobs,
            has_teacher=batch.has_teacher,
            teacher_entropy=batch.teacher_entropy,
            step=step - 1,
            rollout_logprobs=batch.behavior,
        )
    )


def update(run: Run, batch: Batch, prepared: Any) -> dict[str, float]:
    """PPO epochs x mini-batches; each mini-batch is split over data-parallel ranks."""
    cfg, pol, algo = run.cfg, run.policy, run.algo
    g = cfg.rollout.group_size
    mb_rows = cfg.train.mini_batch_prompts * g
    n = len(batch.responses)
    sums: dict[str, float] = {}
    count = skipped = 0
    dp_tokens = [0] * pol.dp_size
    step = run.step + 1
    spoil = [k for k in ("nan_loss", "inf_loss", "nan_grad") if injected(k, step)]  # test hook
    for _epoch in range(cfg.train.ppo_epochs):
        for lo in range(0, n, mb_rows):
            rows = list(range(lo, min(lo + mb_rows, n)))
            num_tokens, num_seqs = prepared.select(rows).normalizers()
            mine = _dp_rows(run, batch, rows, dp_tokens)

            def loss_of(
                lp: torch.Tensor, sub: list[int], tk: Any, nt: float = num_tokens,
                ns: float = num_seqs, first: bool = count == 0,
            ) -> tuple:  # fmt: skip
                # the mini-batch's normalisers, divided by DP size since DDP averages gradients
                loss, metrics = algo.loss(
                    lp,
                    prepared.select(sub),
                    max(nt, 1.0) / pol.dp_size,
                    topk=tk,
                    num_seqs=max(ns, 1.0) / pol.dp_size,
                )
                return (spoil_loss(loss, spoil[0]) if spoil and first else loss), metrics

            topk_ids, teacher_topk = _minibatch_topk(run, batch, mine, first=count == 0)
            m = pol.train_minibatch(
                [batch.row_prompts[i] + batch.row_responses[i] for i in mine],
                [len(batch.row_prompts[i]) for i in mine],
                mine,
                batch.width,
                cfg.train.max_tokens_per_microbatch,
                loss_of,
                topk_ids=topk_ids,
                teacher_topk=teacher_topk,
                routed=_rows_of(batch.routed, mine),
            )
            check_nonfinite(pol.last_nonfinite, step, cfg.train.on_nonfinite)
            skipped += int(m.pop("nonfinite_skipped", 0.0))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["nonfinite_skipped"] = skipped
    if pol.dp_size > 1:
        out["dp_tokens_max_over_mean"] = max(dp_tokens) * pol.dp_size / max(sum(dp_tokens), 1)
        out.update({f"dp_tokens_rank{r}": float(t) for r, t in enumerate(dp_tokens)})
    return out


def _dp_rows(run: Run, batch: Batch, rows: list[int], dp_tokens: list[int]) -> list[int]:
    """This data-parallel rank's rows of a mini-batch, adding every rank's token count to
    `dp_tokens`. `train.balance_dp`: split by tokens (prompt + response; greedy largest-first,
    `megatron/packing.py`), else by position. The loss normalisers are the whole mini-batch's
    (token-mean over all its rows) and DDP sums the ranks' gradients, so the split changes the
    summation order only. GRPO advantages are computed before the split: rows move freely."""
    from rlrt_megatron.megatron.packing import balance_by_tokens

    pol = run.policy
    tokens = [len(batch.row_prompts[i]) + len(batch.row_responses[i]) for i in rows]
    if run.cfg.train.balance_dp and pol.dp_size > 1:
        parts = [[rows[j] for j in p] for p in balance_by_tokens(tokens, pol.dp_size)]
    else:
        per = len(rows) // pol.dp_size
        parts = [rows[r * per : (r + 1) * per] for r in range(pol.dp_size)]
    length = dict(zip(rows, tokens, strict=True))
    for r, part in enumerate(parts):
        dp_tokens[r] += sum(length[i] for i in part)
    return parts[pol.dp_rank]


def _minibatch_topk(run: Run, batch: Batch, mine: list[int], first: bool) -> tuple[Any, Any]:
    """SDPO/SRPO: the support of the distillation term = the top-k ids of the CURRENT student
    (as in the SDPO reference, where they come from the update's own forward), and the teacher's
    log-probs on it. The first mini-batch of a step uses the logprobs phase's (the student has
    not moved yet); later ones recompute both with the updated student (one no-grad student
    forward on the mini-batch, and the teacher forward on its rows with a teacher).
    Returns (topk_ids [b, T, K] | None, (teacher top-k log-probs, teacher entropy) | None)."""
    if batch.topk_ids is None or batch.teacher_topk_logprobs is None:
        return None, None
    entropy = batch.teacher_entropy[mine]
    if first:
        return batch.topk_ids[mine], (batch.teacher_topk_logprobs[mine], entropy)
    pol, algo = run.policy, run.algo
    student, teacher = pol.response_logprobs(
        [batch.row_prompts[i] for i in mine],
        [batch.row_responses[i] for i in mine],
        [batch.teacher_prefixes[i] if batch.teacher_used[i] else None for i in mine],
        token_budget=run.cfg.train.max_tokens_per_microbatch,
        teacher=run.teacher if algo.teacher_weights != "current" else None,
        topk=int(algo.needs_topk),
        routed=_rows_of(batch.routed, mine),
    )
    w = batch.width
    return _pad(student.topk_ids, w), (_pad(teacher.topk_logprobs, w), entropy)


def await_rollouts(run: Run, step: int) -> None:
    """Asynchronous rollouts: wait for the batch sampled during step `step` (next step's batch),
    so that the engine is idle for the weight sync. A no-op for synchronous rollouts."""
    q = run.rollouts
    if q is not None and not q.deferred:
        q.wait_all()


def sync(run: Run, step: int) -> None:
    """Refresh the teacher copy (snapshot / EMA) and push the new weights to the engine; with
    asynchronous rollouts, then queue the engine's sync-check score and the next batch (see
    `trainer/rollouts.py`)."""
    algo = run.algo
    if run.teacher is not None and step > 0:
        if algo.teacher_weights == "ema":
            if algo.ema_rate:  # 0 = a frozen teacher
                run.policy.ema_into(run.teacher, float(algo.ema_rate))
        elif algo.teacher_weights == "snapshot" and step % int(algo.teacher_refresh_every) == 0:
            run.policy.copy_into(run.teacher)
    q = run.rollouts
    if q is not None and not q.deferred:
        q.wait_all()  # done by `await_rollouts` in the loop: the engine is idle
    push_weights(run, step)
    if q is not None:
        q.submit_probe(run, step + 1)
        q.submit(run, step + q.depth + 1)


def push_weights(run: Run, version: int) -> None:
    """Stream the policy's weights (Hugging Face names) into the engine as `version`; with
    asynchronous rollouts on the local engine, copied now and loaded once the generations
    queued before have finished (`RolloutQueue.push_later`)."""
    from rlrt_megatron.convert.load import iter_hf_weights

    # streamed: the engine takes the tensors as they are gathered (SGLang sends them in buckets)
    # bf16 to the engine whenever the policy is not fp32 (FP8 parameters included)
    fp32 = run.policy.params_dtype == torch.float32
    weights = iter_hf_weights(run.policy.chunks, dtype=None if fp32 else torch.bfloat16)
    try:
        q = run.rollouts
        if run.rank == 0 and q is not None and q.deferred:
            q.push_later(
                run.engine, [(n, t.detach().to("cpu", copy=True)) for n, t in weights], version
            )
        elif run.rank == 0:
            run.engine.update_weights(weights, version=version)
    finally:
        for _ in weights:  # lockstep with rank 0's gathers, even if its engine stopped early
            pass
    run.rollout_version = version


def mismatch_metrics(batch: Batch, trainer_v: int) -> dict[str, float]:
    """Engine vs Megatron log-probs of the same tokens. `rollout/logprob_abs_diff` compares them
    under the SAME weights (the training-inference mismatch): over the tokens sampled with the
    trainer's version `trainer_v` (or of unknown version: an engine that does not report it),
    else the sync check's same-version score (`rollout/sync_check_abs_diff`, asynchronous rollouts
    where every token is older). `rollout/stale_logprob_abs_diff` is the same mean over the
    tokens sampled with older weights: the policy change since, not an engine error."""
    mask = batch.mask
    # each token's age in versions (0: the trainer's own, or not reported; padding too), in one
    # host-to-device copy
    age = [[trainer_v - v if v >= 0 else 0 for v in row] for row in batch.token_versions]
    same = mask * (ragged_to_padded(age, mask.shape[1], mask.device) == 0).to(mask.dtype)
    gap = (batch.behavior - batch.student_logprobs).abs()
    out: dict[str, float] = {}
    for key, m in (("rollout/logprob_abs_diff", same), ("rollout/stale_logprob_abs_diff",
                                                       mask - same)):  # fmt: skip
        if float(m.sum()) > 0:
            out[key] = float((gap * m).sum() / m.sum())
    probe = batch.sync_metrics.get("rollout/sync_check_abs_diff")
    if "rollout/logprob_abs_diff" not in out and probe is not None:
        out["rollout/logprob_abs_diff"] = probe
    return out


def step_metrics(
    run: Run, batch: Batch, prepared: Any, upd: dict, times: dict, t0: float
) -> dict[str, Any]:
    g = run.cfg.rollout.group_size
    r = batch.rewards
    mask = batch.mask
    n_tok = float(mask.sum())
    correct = (r > 0.5).float()
    resp_len = mask.sum(1)
    total_tokens = n_tok + sum(len(p) for p in batch.prompts) * g
    step_time = time.perf_counter() - t0
    m: dict[str, Any] = {
        "reward/mean": float(r.mean()),
        "reward/pass_rate": float(correct.mean()),
        "reward/pass_at_group": float(correct.view(-1, g).max(1).values.mean()),
        "response/length_mean": float(resp_len.mean()),
        "response/length_max": float(resp_len.max()),
        "response/truncated": sum(f == "length" for f in batch.finish) / len(batch.finish),
        "entropy/student": float((batch.entropy * mask).sum() / max(n_tok, 1.0)),
        # the rows whose teacher log-probs the algorithm uses (not the diagnostic probe rows)
        "teacher/frac_rows": float(batch.has_teacher.float().mean()),
    }
    m.update({k: v for k, v in batch.reward_info.items() if k != "reward/mean"})
    m.update(batch.sync_metrics)
    m.update(mismatch_metrics(batch, run.step))
    if batch.teacher_logprobs is not None:
        m.update(teacher_metrics(batch, r > 0.5))
    # the rollout correction's mismatch/* metrics keep their own name
    m.update(
        {k if k.startswith("mismatch/") else f"algo/{k}": float(v)
         for k, v in prepared.metrics.items()}
    )  # fmt: skip
    for k, v in upd.items():
        if k in ("grad_norm", "lr", "update_ok", "nonfinite_skipped") or k.startswith("dp_tokens"):
            m[f"train/{k}"] = v
        elif k.startswith("moe/"):  # router metrics of a MoE policy
            m[k] = v
        else:  # "loss" is the mini-batch loss, the rest the algorithm's loss metrics
            m["loss/value" if k == "loss" else f"loss/{k}"] = v
    m.update(times)
    m["time/step"] = step_time
    m["throughput/tokens_per_s"] = total_tokens / max(step_time, 1e-9)
    if mask.is_cuda:  # peak since the last step (rollout engine, log-probs, update, sync)
        m["memory/gpu_peak_gib"] = torch.cuda.max_memory_allocated(mask.device) / 2**30
        torch.cuda.reset_peak_memory_stats(mask.device)
    m["rollout/version"] = run.rollout_version
    m.update(run.extra.get("data_skipped", {}))
    return m


def eval_due(cfg: TrainConfig, step: int) -> bool:
    every = cfg.eval.every
    return bool(cfg.eval.datasets) and every > 0 and (step % every == 0 or step == cfg.train.steps)


def evaluate(run: Run, step: int) -> dict[str, float]:
    """avg@k / pass@k of the engine's current weights (rank 0; fixed seed across steps)."""
    if run.rank != 0:
        return {}
    if run.rollouts is not None:  # the engine evaluates the weights just pushed
        run.rollouts.wait_pushes()
    from rlrt_megatron.eval.benchmarks import load_benchmarks, parse_benchmark_files
    from rlrt_megatron.eval.runner import run_eval

    cfg = run.cfg
    if "eval_benchmarks" not in run.extra:
        items = cfg.eval.datasets
        files = parse_benchmark_files([i for i in items if "=" in i])
        names = [i.split("=", 1)[0] for i in items]
        run.extra["eval_benchmarks"] = load_benchmarks(names, files=files)
    return run_eval(
        run.engine,
        run.extra["eval_benchmarks"],
        cfg.eval.k,
        tokenizer=run.tokenizer,
        reward=run.reward_fn,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        seed=cfg.rollout.seed,
        template=run.prompt_template,
        teacher_template=cfg.data.teacher_template
        if cfg.teacher.eval_probe and run.algo.needs_teacher
        else None,
    )


def checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    every = cfg.checkpoint.save_every
    return (every > 0 and step % every == 0) or (
        cfg.checkpoint.save_final and step == cfg.train.steps
    )


def save_checkpoint(run: Run) -> str:
    extra = None
    state = {
        "step": run.step,
        "rollout_version": run.rollout_version,
        "sampler": run.sampler.state_dict(),
        "scheduler": run.policy.scheduler.state_dict(),
        "algorithm": run.cfg.algorithm.name,
        "time": time.time(),
    }
    if run.rollouts is not None:
        state["rollout_queue"], payloads = run.rollouts.state(run)
        if payloads is not None:
            extra = {ROLLOUT_QUEUE_FILE: payloads}
    ck = run.checkpointer
    previous = ck.latest()
    if injected("enospc", run.step):  # test hook: the disk fills up before the commit
        ck.before_commit = _no_space
    try:
        path = ck.save(
            run.step,
            run.policy.model,
            run.policy.optimizer,
            json.loads(json.dumps(state, default=float)),
            teacher=run.teacher,
            config=run.cfg.to_dict(),
            layout=layout_of(run.cfg, run.world_size),
            extra_files=extra,
        )
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise describe_write_failure(e, ck.root, run.step, previous) from e
    finally:
        ck.before_commit = None
    return path


def _no_space(tmp: str) -> None:
    raise OSError(errno.ENOSPC, f"No space left on device (injected, {INJECT_ENV})", tmp)


__all__ = [
    "Batch",
    "Run",
    "advantages",
    "checkpoint_due",
    "eval_due",
    "evaluate",
    "logprobs",
    "reward",
    "rollout",
    "save_checkpoint",
    "step_metrics",
    "sync",
    "await_rollouts",
    "update",
]
