"""Case 6: SIGTERM twice, to the trainer's whole process group (as Slurm signals a job step:
the checkpoint writer's helper processes get it too), while a checkpoint is being written.
The run finishes that checkpoint, stops at the end of the next step with one more, exits 0,
every checkpoint on disk passes its manifest, and `--resume auto` reproduces the uninterrupted
run's metrics."""

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


def test_sigterm_twice_during_checkpoint_write(tiny_model, tmp_path, fault_row):
    from rlrt_megatron.trainer.ckpt_manifest import verify

    row = fault_row("6 SIGTERM x2 during a checkpoint write", "process group, iter_1's shards",
                    "checkpoints consistent; exit 0; resume exact")  # fmt: skip

    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = subprocess.run(_cmd(tiny_model, ref_dir, "--resume", "none"), capture_output=True,
                         text=True, timeout=900, env=clean_env())  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    writing = os.path.join(run_dir, "checkpoints", "iter_0000001.tmp", "dist")
    with open(tmp_path / "err", "w") as err:
        cmd = _cmd(tiny_model, run_dir, "--resume", "none")
        proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.isdir(writing) and os.listdir(writing):  # the shards are being written
                os.killpg(proc.pid, signal.SIGTERM)
                os.killpg(proc.pid, signal.SIGTERM)
                break
            time.sleep(0.001)
        rc = proc.wait(timeout=600)
    assert rc == 0, (tmp_path / "err").read_text()[-3000:]
    ckpt = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(ckpt) if n.startswith("iter_"))
    assert names == ["iter_0000001", "iter_0000002"], names  # no .tmp left, both complete
    assert all(verify(os.path.join(ckpt, n)) == [] for n in names)
    row.update(exit=rc, detect_s="end of step 2", observed="iter_1 + iter_2 intact, exit 0")
    resumed = subprocess.run(_cmd(tiny_model, run_dir, "--resume", "auto"), capture_output=True,
                             text=True, timeout=900, env=clean_env())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = {r["step"]: computed(r) for r in metrics_rows(ref_dir)}
    assert {r["step"]: computed(r) for r in metrics_rows(run_dir)} == want
    row.update(lost=0, observed=row["observed"] + "; resumed: metrics = reference")
