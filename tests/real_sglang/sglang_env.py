"""Where the `sglang` tier finds its SGLang interpreter and how it launches a CPU server."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = os.environ.get("RLRT_SGLANG_PYTHON") or "/opt/venv-sglang/bin/python"
# SGLang's CPU path: torch-native attention, no CUDA graphs, no overlap thread, a small KV pool
CPU_ARGS = [
    "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
    "--disable-overlap-schedule", "--max-total-tokens", "4096",
]  # fmt: skip
# what the server process needs on top of the trainer's environment
SERVER_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "PYTHONPATH": str(REPO / "tests" / "sglang_cpu"),
}


def sglang_missing() -> str | None:
    """Why the tier cannot run here (None if it can)."""
    if not os.access(SGLANG_PYTHON, os.X_OK):
        return (
            f"no SGLang interpreter at {SGLANG_PYTHON}: build it with `make sglang-env` "
            "(or set RLRT_SGLANG_PYTHON)"
        )
    return None
