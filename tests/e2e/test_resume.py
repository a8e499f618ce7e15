"""Preemption: run 4 steps; run again, SIGTERM after the first steps (checkpoint, exit 0),
resume -> the resumed steps' metrics equal the uninterrupted run's."""

from __future__ import annotations

import os
import subprocess

import pytest
from e2e_helpers import clean_env, computed, metrics_rows, sigterm_after_first_step, train_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.mcore019]


def _cmd(tiny_model: dict, run_dir: str, *extra: str) -> list[str]:
    return train_cmd(tiny_model, run_dir, *extra)


def test_sigterm_then_resume_reproduces_metrics(tiny_model, tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = subprocess.run(
        _cmd(tiny_model, ref_dir, "--resume", "none"),
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = {r["step"]: computed(r) for r in metrics_rows(ref_dir)}
    assert sorted(reference) == [1, 2, 3, 4]

    cmd = _cmd(tiny_model, run_dir, "--resume", "none")
    sigterm_after_first_step(cmd, run_dir, tmp_path / "first.err")
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        stopped = int(f.read().strip().split("_")[1])
    assert 1 <= stopped < 4, "the signal should stop the run before its last step"
    assert [r["step"] for r in metrics_rows(run_dir)] == list(range(1, stopped + 1))

    resumed = subprocess.run(
        _cmd(tiny_model, run_dir, "--resume", "auto"),
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = {r["step"]: computed(r) for r in metrics_rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4]
    for step in range(1, 5):  # the resumed steps (stopped+1..4) included
        assert rows[step] == reference[step], f"step {step} differs after resume"
