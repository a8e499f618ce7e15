"""Shared helpers of the GPU tier's tests."""

from __future__ import annotations

import os


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a trainer subprocess: no inherited rank variables."""
    env = {k: v for k, v in os.environ.items()}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({"PYTHONWARNINGS": "ignore", **extra})
    return env
