"""Rollout batches for the loop: synchronous or one step off-policy, and the sync check.

Synchronous (`rollout.async_steps=0`): step k samples its batch with the weights of step k-1 and
waits for it.

Asynchronous (`rollout.async_steps=1`, :class:`RolloutQueue`): one background thread on rank 0
drives the engine (a `ProcessEngine` for the local engine, or SGLang servers on their own nodes),
so generation overlaps training::

    end of step k:  rollout phase: wait for batch k+1 (sampled with v_{k-1})
                    sync phase:    push weights v_k
                                   ask the engine to score a few rows of batch k+1 (sync check)
                                   submit batch k+2 (sampled with v_k)   -> runs during step k+1

Batch k+1 is trained in step k+1 by a trainer holding v_k: one version behind
(`rollout/staleness` = 1; the first batch after a fresh start has 0). Prompts are rendered and
the sampler advanced on the main thread at submit time; the thread only calls `generate` and
`score`, so the tokenizer and the collectives never run concurrently with the trainer's.

Checkpoints (exact resume): a checkpoint written at the end of step k holds batch k+1 as sampled
(the weights v_{k-1} that made it are gone) and the prompt indices of batch k+2, whose
generation is abandoned. On resume the engine receives v_k from the checkpoint, scores batch k+1
and regenerates batch k+2 with v_k and its seed (`rollout.seed + step`), the same request the
uninterrupted run made, so the resumed run reproduces its metrics.

The sync check (:func:`sync_check`, in the logprobs phase) compares the engine's log-probs with
the trainer's recompute of the same tokens under the same weights version: in synchronous mode
the batch itself (the first rollout after each sync); in asynchronous mode the engine's score of
the batch right after it received the trainer's current weights (batch k+1's rows, v_k). Engines
without `score` (SGLang today) get the version check only in asynchronous mode. Every batch's
per-sample engine version is also checked: more than `async_steps` versions behind means a sync
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
    finish reasons, engine weight version per rollout)."""
    comps = [c for grp in engine.generate(reqs, sampling) for c in grp]
    return (
        prompts,
        [list(c.token_ids) for c in comps],
        [c.text for c in comps],
        [list(c.logprobs) for c in comps],
        [c.finish_reason for c in comps],
        [int(c.weight_version) for c in comps],
    )


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
    """Asynchronous rollouts (module docstring). Every rank holds one (the prompt indices);
    only rank 0 has an engine and a thread."""

    def __init__(self, run: Any) -> None:
        self.rank0 = run.rank == 0
        self.pool = _Worker() if self.rank0 else None
        self.items: dict[int, _Item] = {}
        self.probe: Future | None = None  # rank 0: (step, rows, engine log-probs)
        self.probe_step = -1

    # -- the loop's calls
    def submit(self, run: Any, step: int, idx: list[int] | None = None) -> None:
        """Queue batch `step` (advancing the sampler unless `idx` is given)."""
        if step > run.cfg.train.steps or step in self.items:
            return
        idx = run.sampler.next_indices() if idx is None else list(idx)
        item = _Item(step, idx)
        if self.rank0:
            prompts, reqs, sampling = make_requests(run, step, idx)
            item.future = self.pool.submit(generate, run.engine, prompts, reqs, sampling)
        self.items[step] = item

    def wait(self, step: int) -> None:
        """Block until batch `step` is sampled (rank 0; a no-op elsewhere)."""
        item = self.items.get(step)
        if item is None or item.future is None:
            return
        item.payload = item.future.result()
        item.future = None

    def take(self, step: int) -> tuple[list[int], tuple | None]:
        """(prompt indices, payload on rank 0 / None elsewhere) of batch `step`."""
        if step not in self.items:
            raise RuntimeError(f"rollout queue: batch {step} was never submitted")
        self.wait(step)
        item = self.items.pop(step)
        return item.idx, item.payload

    def submit_probe(self, run: Any, step: int) -> None:
        """Ask the engine (which just received the trainer's weights) to score the first rows of
        batch `step`, the batch the trainer recomputes next with those same weights."""
        item = self.items.get(step)
        score = getattr(run.engine, "score", None) if self.rank0 else None
        self.probe_step = step
        if not self.rank0 or item is None or item.payload is None or score is None:
            self.probe = None
            return
        prompts, responses = item.payload[0], item.payload[1]
        g = run.cfg.rollout.group_size
        n = min(PROBE_ROWS, len(responses))
        rows = [prompts[i // g] for i in range(n)]
        self.probe = self.pool.submit(
            lambda: (step, n, score(rows, responses[:n], run.cfg.rollout.temperature))
        )

    def take_probe(self, step: int) -> tuple[int, list] | None:
        """(rows, engine log-probs) scored for batch `step` on rank 0; None if none was asked
        for that batch (or elsewhere than on rank 0)."""
        if self.probe is None or self.probe_step != step:
            return None
        got_step, n, lps = self.probe.result()
        self.probe = None
        return (n, lps) if got_step == step else None

    # -- checkpoints
    def state(self) -> tuple[dict, dict | None]:
        """(json-able queue state for every rank, rank 0's sampled payloads to save beside it).

        Batches already sampled are saved whole; a batch still generating is saved as its
        prompt indices and regenerated on resume (its weights are the checkpointed ones)."""
        meta = {"batches": [{"step": s, "idx": it.idx} for s, it in sorted(self.items.items())]}
        if not self.rank0:
            return meta, None
        # waited-for batches were sampled with weights older than the checkpointed ones
        return meta, {s: it.payload for s, it in self.items.items() if it.payload is not None}

    def restore(self, run: Any, meta: dict, payloads: dict | None) -> None:
        """Re-create the queue of a checkpoint written at the end of step k: batch k+1 as saved
        (`payloads`, rank 0), the engine's score of it with v_k, then batch k+2 regenerated, in
        the order the uninterrupted run queued them."""
        regenerate = []
        for b in meta.get("batches", []):
            step, idx = int(b["step"]), [int(i) for i in b["idx"]]
            if step == run.step + 1:
                payload = None if payloads is None else tuple(payloads[step])
                self.items[step] = _Item(step, idx, payload=payload)
            else:
                regenerate.append((step, idx))
        self.submit_probe(run, run.step + 1)
        for step, idx in regenerate:
            self.submit(run, step, idx)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def sync_check(run: Any, batch: Any, step: int, probe: tuple | None) -> dict[str, float]:
    """Fail the step when the engine is not running the trainer's weights (module docstring).

    Same result on every rank (the inputs are all-gathered / broadcast). Returns the metrics
    `rollout/staleness`, `rollout/staleness_max` and, when a same-version comparison was made,
    `rollout/sync_check_abs_diff`."""
    cfg = run.cfg
    trainer_v = run.step  # the weights this step starts from: version k-1 in step k
    known = [v for v in batch.versions if v >= 0]  # -1: the engine did not report it
    out: dict[str, float] = {}
    if known:
        stale = [trainer_v - v for v in known]
        out["rollout/staleness"] = sum(stale) / len(stale)
        out["rollout/staleness_max"] = float(max(stale))
        allowed = cfg.rollout.async_steps
        if max(stale) > allowed or min(stale) < 0:
            raise SyncCheckError(
                f"sync check (step {step}): the rollout engine sampled with weights version "
                f"{min(known)}..{max(known)} while the trainer holds version {trainer_v} "
                f"(rollout.async_steps={allowed} allows {allowed} behind): a weight sync was "
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
    "sync_check",
    "sync_tol",
]
