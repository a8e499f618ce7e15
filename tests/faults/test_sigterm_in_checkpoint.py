"""Case 6: SIGTERM twice, to the trainer's whole process group (as Slurm signals a job step:
the checkpoint writer's helper processes get it too), while a checkpoint is being written.
The run finishes that checkpoint, stops at the end of the next step with one more, exits 0,
every checkpoint on disk passes its manifest, and `--resume auto` reproduces the uninterrupted
run's metrics. Also a preemption before any checkpoint exists (SIGTERM during init)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from e2e_helpers import clean_env, computed, metrics_rows, train_cmd

pytestmark = pytest.mark.faults


def _cmd(tiny_model, run_dir: str, *extra: str) -> list[str]:
    return train_cmd(tiny_model, run_dir, "train.steps=3", "checkpoint.save_every=1", *extra)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> dict[int, dict]:
    ref_dir = str(tmp_path_factory.mktemp("ref"))
    ref = subprocess.run(_cmd(tiny_model, ref_dir, "--resume", "none"), capture_output=True,
                         text=True, timeout=900, env=clean_env())  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    return {r["step"]: computed(r) for r in metrics_rows(ref_dir)}


def _signal_twice_when(tiny_model, run_dir: str, ready, err_path) -> int:
    """Start the run in its own process group; once `ready()`, SIGTERM the group twice; return
    the exit code."""
    with open(err_path, "w") as err:
        cmd = _cmd(tiny_model, run_dir, "--resume", "none")
        proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGTERM)
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.001)
        return proc.wait(timeout=600)


def _resume_matches(tiny_model, run_dir: str, reference: dict) -> None:
    resumed = subprocess.run(_cmd(tiny_model, run_dir, "--resume", "auto"), capture_output=True,
                             text=True, timeout=900, env=clean_env())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {r["step"]: computed(r) for r in metrics_rows(run_dir)} == reference


def test_sigterm_twice_during_checkpoint_write(tiny_model, tmp_path, fault_row, reference):
    from rlrt_megatron.trainer.ckpt_manifest import verify

    row = fault_row("6 SIGTERM x2 during a checkpoint write", "process group, iter_1's shards",
                    "checkpoints consistent; exit 0; resume exact")  # fmt: skip
    run_dir = str(tmp_path / "run")
    writing = os.path.join(run_dir, "checkpoints", "iter_0000001.tmp", "dist")

    def ready() -> bool:  # the shards are being written
        return os.path.isdir(writing) and bool(os.listdir(writing))

    rc = _signal_twice_when(tiny_model, run_dir, ready, tmp_path / "err")
    assert rc == 0, (tmp_path / "err").read_text()[-3000:]
    ckpt = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(ckpt) if n.startswith("iter_"))
    assert names == ["iter_0000001", "iter_0000002"], names  # no .tmp left, both complete
    assert all(verify(os.path.join(ckpt, n)) == [] for n in names)
    row.update(exit=rc, detect_s="end of step 2", observed="iter_1 + iter_2 intact, exit 0")
    _resume_matches(tiny_model, run_dir, reference)
    row.update(lost=0, observed=row["observed"] + "; resumed: metrics = reference")


def test_sigterm_before_the_first_checkpoint(tiny_model, tmp_path, fault_row, reference):
    """Preemption while the run starts (no checkpoint exists yet): step 1 finishes, is
    checkpointed, exit 0; the resume continues from it (case 10's trainer side, off Slurm)."""
    row = fault_row("10 preemption before any checkpoint", "SIGTERM x2 during init",
                    "step 1 checkpointed, exit 0; resume exact")  # fmt: skip
    run_dir = str(tmp_path / "run")
    started = os.path.join(run_dir, "config.json")  # written first thing by setup
    rc = _signal_twice_when(tiny_model, run_dir, lambda: os.path.isfile(started), tmp_path / "err")
    assert rc == 0, (tmp_path / "err").read_text()[-3000:]
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "latest"]
    assert [r["step"] for r in metrics_rows(run_dir)] == [1]
    row.update(exit=rc, detect_s="end of step 1", observed="iter_1 written, exit 0")
    _resume_matches(tiny_model, run_dir, reference)
    row.update(lost=0, observed=row["observed"] + "; resumed: metrics = reference")
