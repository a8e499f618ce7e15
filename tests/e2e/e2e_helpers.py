"""Shared overrides of the e2e tests (imported by the test modules and spawned workers)."""

from __future__ import annotations

import json
import os
import sys

# Small and fast: every e2e run adds these to a tiny_demo* recipe.
FAST = [
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=2",
    "data.synthetic_size=256",
    "logging.console=none",
    "logging.tensorboard=false",
    "checkpoint.save_every=0",
    "checkpoint.save_final=false",
    "checkpoint.resume=none",
    "eval.every=0",
]

# Metrics that depend on wall-clock time or the allocator, not on the computation.
TIMING_PREFIXES = ("time/", "throughput/", "memory/")


def model_overrides(tiny_model: dict[str, str]) -> list[str]:
    return [f"model.hf_path={tiny_model['hf']}", f"model.megatron_ckpt={tiny_model['megatron']}"]


def computed(row: dict) -> dict:
    """A metrics row without its timing entries."""
    return {k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)}


def train_cmd(tiny_model: dict[str, str], run_dir: str, *extra: str) -> list[str]:
    """`rlrt train --recipe tiny_demo` for 4 steps with FAST (checkpointing left to `extra`)."""
    ov = [o for o in FAST if not o.startswith(("checkpoint.save_final", "checkpoint.resume"))]
    return [
        sys.executable, "-m", "rlrt_megatron.cli", "train", "--recipe", "tiny_demo",
        *ov, *model_overrides(tiny_model), "train.steps=4", f"logging.run_dir={run_dir}",
        *extra,
    ]  # fmt: skip


def clean_env() -> dict[str, str]:
    """The environment of a trainer subprocess: one thread, no inherited rank variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def metrics_rows(run_dir: str) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl` written so far ([] before the first step)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def sigterm_after_first_step(cmd: list[str], run_dir: str, err_path) -> None:
    """Start `cmd`, SIGTERM it once its first step's metrics are written (step 2 is running at
    the latest), and require the preemption exit: checkpoint written, status 0."""
    import signal
    import subprocess
    import time

    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while not metrics_rows(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    assert rc == 0, open(err_path).read()[-3000:]
