"""Shared overrides of the e2e tests (imported by the test modules and spawned workers)."""

from __future__ import annotations

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
