"""Bad config values fail before any work, naming the dotted key (exit status 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "override, expect",
    [
        ("optimizer.lr=-1e-6", "optimizer.lr: must be > 0"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("parallel.tp=3", "parallel.tp: 3 does not divide the model's num_attention_heads=4"),
        ("algorithm.rlrt.alhpa=0.5", "did you mean algorithm.rlrt.alpha"),
    ],
)
def test_bad_value_fails_before_work(tmp_path, override, expect):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlrt_megatron.cli", "train", "--recipe", "tiny_demo",
         f"logging.run_dir={run_dir}", override],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect in proc.stderr
    assert not run_dir.exists(), "no work (no run directory) before the config is valid"
