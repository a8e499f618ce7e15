"""Preemption: run 4 steps; run again, SIGTERM after the first steps (checkpoint, exit 0),
resume -> the resumed steps' metrics equal the uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from e2e_helpers import FAST, computed, model_overrides

pytestmark = pytest.mark.e2e


def _cmd(tiny_model: dict, run_dir: str, *extra: str) -> list[str]:
    ov = [o for o in FAST if not o.startswith(("checkpoint.save_final", "checkpoint.resume"))]
    return [
        sys.executable, "-m", "rlrt_megatron.cli", "train", "--recipe", "tiny_demo",
        *ov, *model_overrides(tiny_model), "train.steps=4", f"logging.run_dir={run_dir}",
        *extra,
    ]  # fmt: skip


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def test_sigterm_then_resume_reproduces_metrics(tiny_model, tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = subprocess.run(
        _cmd(tiny_model, ref_dir, "--resume", "none"),
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = {r["step"]: computed(r) for r in _rows(ref_dir)}
    assert sorted(reference) == [1, 2, 3, 4]

    proc = subprocess.Popen(
        _cmd(tiny_model, run_dir, "--resume", "none"), env=_env(),
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.err", "w"),  # noqa: SIM115
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not _rows(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # during step 2 at the latest: checkpoint, exit 0
    assert proc.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()[-3000:]
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        stopped = int(f.read().strip().split("_")[1])
    assert 1 <= stopped < 4, "the signal should stop the run before its last step"
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, stopped + 1))

    resumed = subprocess.run(
        _cmd(tiny_model, run_dir, "--resume", "auto"),
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = {r["step"]: computed(r) for r in _rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4]
    for step in range(1, 5):  # the resumed steps (stopped+1..4) included
        assert rows[step] == reference[step], f"step {step} differs after resume"
