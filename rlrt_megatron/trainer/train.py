"""The RL loop: one screen of named phases (DESIGN.md), each under the watchdog.

    rollout -> reward -> logprobs -> advantages -> update -> sync -> [eval] -> log / checkpoint

Every rank runs the loop. The rollout engine and the reward workers live on rank 0 (local engine)
and their results are broadcast; the algorithm (`rlrt_megatron.algorithms.get_algorithm`) is the
only thing that knows what it computes, through its `needs_teacher` / `teacher_context` /
`teacher_weights` / `needs_topk` attributes, so there is no per-algorithm branch here.
Setup and the phase bodies live in `trainer/steps.py`. With `rollout.async_steps=1` the same
phases run, but `rollout` takes a batch the engine sampled during the previous step, a second
`rollout` phase after `update` waits for the batch sampled during this one, and `sync` queues the
next (`trainer/rollouts.py`); the logprobs phase runs the sync check either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rlrt_megatron.config import TrainConfig
from rlrt_megatron.trainer import steps
from rlrt_megatron.trainer.checkpoint import SignalFlag
from rlrt_megatron.trainer.faults import maybe_kill
from rlrt_megatron.trainer.setup import setup, teardown
from rlrt_megatron.trainer.teacher import check_teacher


class _Phases:
    """`phase(name, fn, *args)`: run `fn` under the watchdog's `name` timeout and time it (a
    phase run twice in a step adds up)."""

    def __init__(self, wd: Any, times: dict[str, float], step: int = 0, rank: int = 0) -> None:
        self.wd, self.times, self.step, self.rank = wd, times, step, rank

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        with self.wd.phase(name):
            maybe_kill(name, self.step, self.rank)  # test hook (RLRT_FAULT_INJECT)
            out = fn(*args)
        key = f"time/{name}"
        self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t
        return out


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run `cfg` (all ranks call it). Returns `{"step", "status", "metrics": [...]}` where status
    is "done", "preempted" (SIGTERM/SIGUSR1: checkpoint written) or "stopped" (`stop_after`)."""
    signals = SignalFlag().install()
    run = setup(cfg)  # dist init, model, optimizer, engine, data, resume (phase "init")
    wd, history = run.watchdog, []
    status = "done"
    try:
        for step in range(run.step + 1, cfg.train.steps + 1):
            t0, times = time.perf_counter(), {}

            phase = _Phases(wd, times, step, run.rank)
            batch = phase("rollout", steps.rollout, run, step)
            phase("reward", steps.reward, run, batch)
            phase("logprobs", steps.logprobs, run, batch)
            prepared = phase("advantages", steps.advantages, run, batch, step)
            update = phase("update", steps.update, run, batch, prepared)
            phase("rollout", steps.await_rollouts, run, step)  # async: the next batch
            phase("sync", steps.sync, run, step)
            metrics = steps.step_metrics(run, batch, prepared, update, times, t0)
            check_teacher(run, metrics)
            if steps.eval_due(cfg, step):
                metrics.update(phase("eval", steps.evaluate, run, step))
            phase("log", run.logger.log, step, metrics)
            history.append({"step": step, **metrics})
            run.step = step
            preempt = signals.agreed()
            if preempt or steps.checkpoint_due(cfg, step):
                phase("checkpoint", steps.save_checkpoint, run)
            if preempt:
                status = "preempted"
                run.logger.message(f"signal received: checkpoint at step {step} written, exiting")
                break
            if stop_after is not None and step >= stop_after:
                status = "stopped"
                break
    finally:
        signals.uninstall()
        teardown(run)
    return {"step": run.step, "status": status, "metrics": history}
