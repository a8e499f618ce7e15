"""Rollout batches for the loop: synchronous or off-policy by a bounded number of versions, and
the sync check.

Synchronous (`rollout.max_staleness=0`): step k samples its batch with the weights of step k-1
(v_{k-1}, the trainer's) and waits for it: on-policy up to the engine's numerics.

Bounded staleness (`rollout.max_staleness=K >= 1`, :class:`RolloutQueue`; `rollout.async_steps=1`
is its old name for K=1): one background thread on rank 0 drives the engine (a `ProcessEngine`
for the local engine, or SGLang servers on their own nodes), so generation overlaps training.
The engine works through one queue in a fixed order::

    end of step k:  sync phase: push weights v_k         (local engine: a job of the queue)
                                score a few rows of batch k+1 with v_k (the sync check)
                                submit batch k+K+1       (sampled with v_k)
    step k+1:       rollout phase: wait for batch k+1    (sampled with v_{k-K})

Batch k is trained in step k by a trainer holding v_{k-1} and was sampled with v_{k-K-1}: K
versions behind (`rollout/staleness` = K; the first K batches of a fresh start use the initial
weights and are less behind). With the local engine the push waits in the queue behind the
batches already submitted, so the trainer waits for generation only when the engine is more than
K batches late; SGLang pushes wait until the engine is idle. Prompts are rendered and the sampler
advanced on the main thread at submit time; the thread only calls `generate`, `update_weights`
and `score`, so the tokenizer and the collectives never run concurrently with the trainer's.
Every token carries the version that sampled it (`Batch.token_versions`; one per rollout unless
partial rollouts resumed it across a push): `rollout/staleness_mean` and
`rollout/tokens_stale_<d>` count tokens.

Checkpoints (exact resume): a checkpoint written at the end of step k holds batches k+1..k+K as
sampled (the weights that made them are gone; they are waited for) and the prompt indices of
batch k+K+1, whose generation is abandoned. On resume the engine receives v_k from the checkpoint,
scores batch k+1 and regenerates batch k+K+1 with v_k and its seed (`rollout.seed + step`), the
same request the uninterrupted run made, so the resumed run reproduces its metrics. A checkpoint
at the run's last step holds no batch past it: resumed with a larger `train.steps`, the missing
batches are sampled with the checkpoint's weights (not the older ones an uninterrupted longer run
would have used). The bound K of a checkpoint is the one it resumes with.

The sync check (:func:`sync_check`, in the logprobs phase) compares the engine's log-probs with
the trainer's recompute of the same tokens under the same weights version: in synchronous mode
the batch itself (the first rollout after each sync); in asynchronous mode the engine's score of
the batch right after it received the trainer's current weights (batch k+1's rows, v_k). Engines
without `score` (SGLang today) get the version check only in asynchronous mode. Every batch's
per-sample engine version is also checked: more than `max_staleness` versions behind means a sync
was missed.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

# Per-dtype defaults of rollout.sync_check_tol (mean |engine - trainer| log-prob, same weights).
# fp32 engine vs fp32 trainer: different kernels only (~3e-7 on the demo); a stale engine is
# one optimizer step off (~1e-2 on the demo). A bf16 engine alone is ~2e-3 off on the demo and
# up to ~1e-2 on large models, so its bound only catches wrong weights (O(1) differences).
SYNC_TOL_FP32 = 1e-3
SYNC_TOL_BF16 = 0.1
# Rows of the batch the engine scores after each sync in asynchronous mode.
PROBE_ROWS = 8


class SyncCheckError(RuntimeError):
    """The rollout engine does not run the trainer's weights."""


class RolloutQueueError(RuntimeError):
    """A batch in flight could not be generated when the loop needed it whole (a checkpoint)."""


def sync_tol(cfg: Any) -> float:
    """`rollout.sync_check_tol`, or its per-dtype default when 0 (< 0 = check off)."""
    from rlrt_megatron.platform import resolve_dtype

    r = cfg.rollout
    if r.sync_check_tol != 0:
        return float(r.sync_check_tol)
    if r.engine == "sglang":
        engine = torch.float32 if r.sglang_dtype == "float32" else torch.bfloat16
    else:
        engine = resolve_dtype(r.local_dtype)
    trainer = resolve_dtype(cfg.model.params_dtype)
    both_fp32 = engine == torch.float32 and trainer == torch.float32
    return SYNC_TOL_FP32 if both_fp32 else SYNC_TOL_BF16


def make_requests(run: Any, step: int, idx: list[int]) -> tuple[list, list, Any]:
    """(prompt ids per group, GenerateRequests, SamplingParams) of step `step`'s prompts."""
    from rlrt_megatron.data import render_prompt
    from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams

    cfg = run.cfg
    prompts = [
        render_prompt(run.tokenizer, run.dataset[i].problem, run.prompt_template).token_ids
        for i in idx
    ]
    sampling = SamplingParams(
        n=cfg.rollout.group_size,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=cfg.rollout.seed + step,
    )
    reqs = [GenerateRequest(p, request_id=f"{step}-{g}") for g, p in enumerate(prompts)]
    return prompts, reqs, sampling


def generate(engine: Any, prompts: list, reqs: list, sampling: Any) -> tuple:
    """The broadcastable payload of one batch: (prompts, responses, texts, behavior log-probs,
    finish reasons, engine weight version per rollout), and `{"routed_experts": [...]}` last when
    the engine recorded each rollout's MoE experts (routing replay)."""
    from rlrt_megatron.trainer.faults import maybe_kill_engine

    maybe_kill_engine(engine, int(reqs[0].request_id.split("-")[0]) if reqs else 0)  # test hook
    comps = [c for grp in engine.generate(reqs, sampling) for c in grp]
    payload = (
        prompts,
        [list(c.token_ids) for c in comps],
        [c.text for c in comps],
        [list(c.logprobs) for c in comps],
        [c.finish_reason for c in comps],
        [int(c.weight_version) for c in comps],
    )
    if any("routed_experts" in c.meta for c in comps):
        return (*payload, {"routed_experts": [c.meta.get("routed_experts") for c in comps]})
    return payload


def routed_experts(cfg: Any, rest: list) -> list | None:
    """Pop the engine's experts per rollout off the end of a broadcast payload's extra fields
    (`rest`, see `generate`); None unless the trainer replays them (`model.moe.routing_replay`)."""
    routed = None
    if rest and isinstance(rest[-1], dict) and "routed_experts" in rest[-1]:
        routed = rest.pop()["routed_experts"]
    if cfg.model.moe.routing_replay != "rollout":
        return None
    if routed is None or any(r is None for r in routed):
        raise RuntimeError(
            "model.moe.routing_replay=rollout: the rollout engine returned no routed experts "
            f"for this batch (rollout.engine={cfg.rollout.engine!r}); the local engine records "
            "them for a MoE model when built with record_experts"
        )
    return routed


class _Worker:
    """One daemon thread running submitted calls in order (a daemon, unlike a
    ThreadPoolExecutor's, so a preempted trainer exits without waiting for an HTTP generation
    on remote SGLang servers to finish)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="rollout").start()

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        self.jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)

    def shutdown(self) -> None:
        """Cancel what has not started; the running call is abandoned."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self.jobs.put(None)


@dataclass
class _Item:
    step: int
    idx: list[int]
    future: Future | None = None  # rank 0 while generating
    payload: tuple | None = None  # rank 0 once done


class RolloutQueue:
    """Asynchronous rollouts with a staleness bound K = `rollout.max_staleness` (module
    docstring). Every rank holds one (the prompt indices); only rank 0 has an engine and a
    thread. With the local engine, weight pushes are jobs of the same thread, queued behind the
    generations submitted before them: the engine's order of work is fixed by the loop, not by
    timing, so runs and resumes reproduce. SGLang pushes happen on the main thread once the
    engine is idle."""

    def __init__(self, run: Any) -> None:
        self.rank0 = run.rank == 0
        self.pool = _Worker() if self.rank0 else None
        self.bound = run.cfg.rollout.staleness
        self.partial = bool(run.cfg.rollout.partial)
        # batches in flight: K, or one round for partial rollouts (their older tokens make K)
        self.depth = 1 if self.partial else self.bound
        self.deferred = run.cfg.rollout.engine == "local"
        self.last_pool: list = []  # rank 0, partial: the pool after the last batch taken
        self.items: dict[int, _Item] = {}
        self.pushes: list[Future] = []  # rank 0: queued weight pushes (errors surface in take)
        self.probe: Future | None = None  # rank 0: (step, rows, engine log-probs)
        self.probe_step = -1

    # -- the loop's calls
    def start(self, run: Any) -> None:
        """A fresh run: batches 1..K+1, all sampled with the initial weights."""
        for step in range(run.step + 1, run.step + self.depth + 2):
            self.submit(run, step)

    def submit(self, run: Any, step: int, idx: list[int] | None = None) -> None:
        """Queue batch `step` (advancing the sampler unless `idx` is given)."""
        if step > run.cfg.train.steps or step in self.items:
            return
        if idx is None:
            idx = run.sampler.next_indices()
            if self.partial and step == 1:  # the pool holds two batches of prompts
                idx += run.sampler.next_indices()
        item = _Item(step, list(idx))
        if self.rank0:
            prompts, reqs, sampling = make_requests(run, step, item.idx)
            if self.partial:
                item.future = self.pool.submit(self._round(run, step, prompts, sampling, item.idx))
            else:
                item.future = self.pool.submit(generate, run.engine, prompts, reqs, sampling)
        self.items[step] = item

    def _round(self, run: Any, step: int, prompts: list, sampling: Any, idx: list[int]) -> Any:
        """The job of a partial-rollout round making batch `step` (`rollout/partial.py`): the
        pool left by the round before, plus these prompts' groups."""
        from rlrt_megatron.rollout.partial import batch_payload, new_group, run_round

        g = run.cfg.rollout.group_size
        pairs = enumerate(zip(idx, prompts, strict=True))
        new = [new_group(i, p, sampling.seed, r, g) for r, (i, p) in pairs]
        prev = self.items.get(step - 1)
        src = None if prev is None else (prev.future, prev.payload)
        last, engine = self.last_pool, run.engine
        batch_groups, oldest = run.cfg.train.prompts_per_step, step - 1 - self.bound

        def job() -> tuple:
            # runs after the round before (same thread, submitted before)
            if src is None:
                pool = last
            else:
                pool = (src[0].result() if src[0] is not None else src[1])[1]
            done, left, info = run_round(
                engine, pool + new, sampling, batch_groups=batch_groups, oldest_allowed=oldest
            )
            return batch_payload(done, info), left

        return job

    def push_later(self, engine: Any, tensors: list, version: int) -> None:
        """Queue a weight push behind the generations submitted so far (rank 0, local engine)."""
        self.pushes.append(self.pool.submit(engine.update_weights, tensors, version))

    def wait(self, step: int) -> None:
        """Block until batch `step` is sampled (rank 0; a no-op elsewhere)."""
        item = self.items.get(step)
        if item is None or item.future is None:
            return
        item.payload = item.future.result()
        item.future = None

    def wait_pushes(self) -> None:
        """Block until the engine has loaded every queued weight push (rank 0)."""
        for fut in self.pushes:
            fut.result()
        self.pushes.clear()

    def wait_all(self) -> None:
        """Block until every submitted batch is sampled (the engine is then idle)."""
        for step in sorted(self.items):
            self.wait(step)

    def take(self, step: int) -> tuple[list[int], tuple | None]:
        """(prompt indices, payload on rank 0 / None elsewhere) of batch `step`."""
        if step not in self.items:
            raise RuntimeError(f"rollout queue: batch {step} was never submitted")
        self.wait(step)
        for fut in [f for f in self.pushes if f.done()]:
            self.pushes.remove(fut)
            fut.result()  # a failed weight push raises here
        item = self.items.pop(step)
        if self.partial and item.payload is not None:  # rank 0: (batch, pool left)
            self.last_pool = item.payload[1]
            return item.idx, item.payload[0]
        return item.idx, item.payload

    def submit_probe(self, run: Any, step: int) -> None:
        """Ask the engine (which has just received, or will receive first, the trainer's weights)
        to score the first rows of batch `step`, the batch the trainer recomputes next with those
        same weights."""
        item = self.items.get(step)
        score = getattr(run.engine, "score", None) if self.rank0 else None
        self.probe_step = step
        if not self.rank0 or item is None or score is None:
            self.probe = None
            return
        src, payload = item.future, item.payload
        g = run.cfg.rollout.group_size
        temperature = run.cfg.rollout.temperature
        partial = self.partial

        def job() -> tuple:
            # runs after the batch's generation (same thread, submitted before)
            got = payload if src is None else src.result()
            prompts, responses = (got[0] if partial else got)[:2]
            n = min(PROBE_ROWS, len(responses))
            rows = [prompts[i // g] for i in range(n)]
            routed = None if partial else routed_experts(run.cfg, list(got[6:]))
            kw = {}  # the local engine replays the experts the trainer replays (not SGLang)
            if routed is not None and run.cfg.rollout.engine == "local":
                kw["routed"] = routed[:n]
            return step, n, score(rows, responses[:n], temperature, **kw)

        self.probe = self.pool.submit(job)

    def take_probe(self, step: int) -> tuple[int, list] | None:
        """(rows, engine log-probs) scored for batch `step` on rank 0; None if none was asked
        for that batch (or elsewhere than on rank 0)."""
        if self.probe is None or self.probe_step != step:
            return None
        got_step, n, lps = self.probe.result()
        self.probe = None
        return (n, lps) if got_step == step else None

    # -- checkpoints
    def state(self, run: Any) -> tuple[dict, dict | None]:
        """(json-able queue state for every rank, rank 0's sampled payloads to save beside it).

        A checkpoint at the end of step k holds weights v_k only: batches k+1..k+K, sampled with
        older weights, are waited for and saved whole; batch k+K+1 (sampled with v_k) is saved as
        its prompt indices and regenerated on resume."""
        for step in sorted(self.items):
            if step <= run.step + self.depth:
                try:
                    self.wait(step)
                except Exception as e:
                    raise RolloutQueueError(
                        f"the checkpoint of step {run.step} needs batch {step} (sampled with older "
                        f"weights, saved whole) and its generation failed: {type(e).__name__}: {e}."
                        f" This checkpoint is not written; `--resume auto` starts from the latest "
                        f"intact one and redoes the steps after it"
                    ) from e
        meta = {
            "max_staleness": self.bound,
            "partial": self.partial,
            "batches": [{"step": s, "idx": it.idx} for s, it in sorted(self.items.items())],
        }
        if not self.rank0:
            return meta, None
        saved: dict = {s: it.payload for s, it in self.items.items() if it.payload is not None}
        if self.partial:
            saved["pool"] = self.last_pool
        return meta, saved

    def restore(self, run: Any, meta: dict, payloads: dict | None) -> None:
        """Re-create the queue of a checkpoint written at the end of step k: batches k+1..k+K as
        saved (`payloads`, rank 0), the engine's score of batch k+1 with v_k, then batch k+K+1
        regenerated with v_k, in the order the uninterrupted run queued them. A checkpoint at
        the run's last step holds no batch past it: a resume with a larger train.steps samples
        the missing ones now, with the checkpointed weights."""
        saved = (int(meta.get("max_staleness", 1)), bool(meta.get("partial", False)))
        if saved != (self.bound, self.partial):
            raise RuntimeError(
                f"the checkpoint at step {run.step} was written with rollout.max_staleness="
                f"{saved[0]} rollout.partial={saved[1]}; resume it with these (its queued "
                "batches were sampled for them)"
            )
        if self.partial and payloads is not None:
            self.last_pool = list(payloads.get("pool", []))
        regenerate = []
        for b in meta.get("batches", []):
            step, idx = int(b["step"]), [int(i) for i in b["idx"]]
            payload = None if payloads is None else payloads.get(step)
            if self.rank0 and payload is None:
                regenerate.append((step, idx))
            else:
                self.items[step] = _Item(
                    step, idx, payload=None if payload is None else tuple(payload)
                )
        self.submit_probe(run, run.step + 1)
        for step, idx in regenerate:
            self.submit(run, step, idx)
        for step in range(run.step + 1, run.step + self.depth + 2):
            self.submit(run, step)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def staleness_metrics(token_versions: list[list[int]], trainer_v: int) -> dict[str, float]:
    """Token-level staleness of a batch trained by a trainer holding `trainer_v`:
    `rollout/staleness_mean` over the tokens and `rollout/tokens_stale_<d>`, the number of tokens
    sampled d versions behind (engines that report no version: none). `rollout/staleness` and
    `_max` (`sync_check`) are per rollout, a rollout's version being its oldest token's."""
    counts: dict[int, int] = {}
    for row in token_versions:
        for v in row:
            if v >= 0:
                counts[trainer_v - v] = counts.get(trainer_v - v, 0) + 1
    total = sum(counts.values())
    if not total:
        return {}
    out = {"rollout/staleness_mean": sum(d * c for d, c in counts.items()) / total}
    out.update({f"rollout/tokens_stale_{d}": float(c) for d, c in sorted(counts.items())})
    return out


def unreplayed_probe(run: Any, batch: Any, probe: tuple | None) -> Any:
    """MoE routing replay with SGLang: SGLang scores the probe rows routing itself (it cannot
    replay experts), so the trainer's side of the comparison routes itself too, on those few
    rows (`[rows, T_resp]` log-probs; collective). None otherwise (the local engine replays)."""
    if probe is None or batch.routed is None or run.cfg.rollout.engine == "local":
        return None
    rows = range(probe[0])
    own, _ = run.policy.response_logprobs(
        [batch.row_prompts[i] for i in rows],
        [batch.row_responses[i] for i in rows],
        [None] * len(rows),
        token_budget=run.cfg.train.max_tokens_per_microbatch,
    )
    return own.logprobs


def sync_check(
    run: Any, batch: Any, step: int, probe: tuple | None, probe_trainer: Any = None
) -> dict[str, float]:
    """Fail the step when the engine is not running the trainer's weights (module docstring).

    Same result on every rank (the inputs are all-gathered / broadcast). Returns the metrics
    `rollout/staleness`, `rollout/staleness_max` and, when a same-version comparison was made,
    `rollout/sync_check_abs_diff`. `probe_trainer`: the trainer's log-probs to compare the
    probe with when they are not the batch's (MoE replay with an engine that cannot replay)."""
    cfg = run.cfg
    trainer_v = run.step  # the weights this step starts from: version k-1 in step k
    known = [v for v in batch.versions if v >= 0]  # -1: the engine did not report it
    out = staleness_metrics(batch.token_versions, trainer_v)
    if known:
        stale = [trainer_v - v for v in known]
        out["rollout/staleness"] = sum(stale) / len(stale)
        out["rollout/staleness_max"] = float(max(stale))
        allowed = cfg.rollout.staleness
        if max(stale) > allowed or min(stale) < 0:
            raise SyncCheckError(
                f"sync check (step {step}): the rollout engine sampled with weights version "
                f"{min(known)}..{max(known)} while the trainer holds version {trainer_v} "
                f"(rollout.max_staleness={allowed} allows {allowed} behind): a weight sync was "
                "missed or the engine restarted on old weights"
            )
    tol = sync_tol(cfg)
    if tol < 0:
        return out
    mask, trainer_lp = batch.mask, batch.student_logprobs
    if known and min(known) == max(known) == trainer_v:
        engine_v, engine_lp, rows = trainer_v, batch.behavior, mask.shape[0]
    elif probe is not None:
        rows, lps = probe
        from rlrt_megatron.trainer.state import ragged_to_padded

        engine_v = trainer_v
        engine_lp = ragged_to_padded(lps, mask.shape[1], mask.device)
        if probe_trainer is not None:
            trainer_lp = probe_trainer
    else:
        return out
    m = mask[:rows]
    diff = float(((engine_lp[:rows] - trainer_lp[:rows]).abs() * m).sum() / m.sum().clamp(min=1))
    out["rollout/sync_check_abs_diff"] = diff
    if not diff <= tol:
        raise SyncCheckError(
            f"sync check (step {step}): the rollout engine's log-probs (weights version "
            f"{engine_v}) and the trainer's recompute (weights version {trainer_v}) of the same "
            f"{int(m.sum())} tokens differ by {diff:.3g} on average > rollout.sync_check_tol="
            f"{tol:g}: the engine is not running the trainer's weights (a missed or partial "
            "weight sync); fix the sync, or raise rollout.sync_check_tol if the engine's "
            "precision alone explains the gap (see `rollout/sync_check_abs_diff`)"
        )
    return out


__all__ = [
    "RolloutQueue",
    "SyncCheckError",
    "generate",
    "make_requests",
    "staleness_metrics",
    "sync_check",
    "sync_tol",
]
