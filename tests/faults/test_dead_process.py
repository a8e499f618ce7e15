"""Cases 1 and 2, a process dies by SIGKILL (`RLRT_FAULT_INJECT`, `trainer/faults.py`):

- a trainer rank (two ranks started as srun / torchrun start them: one process each, RANK /
  WORLD_SIZE / MASTER_* set) at DP=2 in the `update` phase and at TP=2 in the `logprobs` phase:
  the other rank exits non-zero within the phase timeout (+ 10 s), naming the phase, its stacks
  in `<run_dir>/logs/watchdog_rank0.log`; nothing hangs; the checkpoint before is intact and
  `--resume auto` (same layout) reproduces the uninterrupted run's metrics;
- the local engine's process (`rollout.local_process=true`, and `rollout.async_steps=1`) while
  it generates: the engine's policy is a clear failure (no restart: `rollout/process.py`), in
  the `rollout` phase (or the next engine call, `sync`, if the batch was done), never training
  on a partial batch; the metrics hold only the steps trained, and
  `--resume auto` reproduces the uninterrupted run's metrics.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from dist_utils import free_port
from e2e_helpers import clean_env, computed, metrics_rows, train_cmd

pytestmark = pytest.mark.faults

PHASE_TIMEOUT = 30  # seconds, for the phase the rank dies in


def _launch(tiny_model, run_dir: str, world: int, *extra: str, env: dict | None = None) -> list:
    """Start `world` ranks of `rlrt train` (2 steps, a checkpoint each), wait for all; per rank
    (exit code, unix time of exit, stderr)."""
    cmd = train_cmd(tiny_model, run_dir, "train.steps=2", "checkpoint.save_every=1", *extra)
    port, procs = free_port(), []
    os.makedirs(run_dir, exist_ok=True)
    for r in range(world):
        e = {**clean_env(), **(env or {}), "RANK": str(r), "LOCAL_RANK": str(r),
             "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        err = open(os.path.join(run_dir, f"rank{r}.err"), "w+")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=err,
                                       start_new_session=True), err))  # fmt: skip
    ends: dict[int, float] = {}
    deadline = time.monotonic() + 900
    try:
        while len(ends) < world and time.monotonic() < deadline:
            for r, (p, _) in enumerate(procs):
                if r not in ends and p.poll() is not None:
                    ends[r] = time.time()
            time.sleep(0.05)
    finally:
        for p, _ in procs:  # nothing may outlive the test (a hang is a failure, not a leak)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = []
    for r, (p, err) in enumerate(procs):
        err.seek(0)
        out.append((p.wait(), ends.get(r), err.read()))
    return out


def _injected_at(stderr: str) -> float:
    return float(re.search(r"fault injected: .* at (\d+\.\d+)", stderr).group(1))


def _rows(run_dir: str) -> dict[int, dict]:
    return {r["step"]: computed(r) for r in metrics_rows(run_dir)}


@pytest.mark.parametrize(
    "layout, phase",
    [("parallel.tp=1", "update"), ("parallel.tp=2", "logprobs")],
    ids=["dp2", "tp2"],
)
def test_killed_rank_is_detected_within_the_phase_timeout(
    tiny_model, tmp_path, fault_row, layout, phase
):
    from rlrt_megatron.trainer.ckpt_manifest import verify

    name = "DP=2" if layout.endswith("1") else "TP=2"
    expected = f"rank 0 exits non-zero naming '{phase}' <= timeout + 10 s; resume exact"
    row = fault_row(f"1 kill -9 of rank 1 ({name})", f"phase {phase} of step 2", expected)
    run_dir = str(tmp_path / "run")
    timeout = f"timeouts.{phase}={PHASE_TIMEOUT}"
    env = {"RLRT_FAULT_INJECT": f"kill9_{phase}@2", "RLRT_FAULT_RANK": "1"}
    (rc0, end0, err0), (rc1, _, err1) = _launch(tiny_model, run_dir, 2, layout, timeout,
                                                "--resume", "none", env=env)  # fmt: skip
    assert rc1 == -signal.SIGKILL, err1[-2000:]
    assert rc0 not in (0, None) and end0 is not None, err0[-3000:]
    assert f"rank 0: phase '{phase}'" in err0, err0[-3000:]
    log = open(os.path.join(run_dir, "logs", "watchdog_rank0.log")).read()
    assert f"phase '{phase}'" in log and 'File "' in log  # the stacks
    detect = end0 - _injected_at(err1)
    assert detect <= PHASE_TIMEOUT + 10, detect
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "latest"]
    assert verify(os.path.join(ckpt, "iter_0000001")) == []
    assert sorted(_rows(run_dir)) == [1]  # step 2 never logged: nothing half-trained
    row.update(exit=rc0, detect_s=round(detect, 1),
               observed=f"rank 0 exit {rc0} naming '{phase}', stacks; iter_1 intact")  # fmt: skip
    ref_dir = str(tmp_path / "ref")
    ref = _launch(tiny_model, ref_dir, 2, layout, "--resume", "none")
    assert [r[0] for r in ref] == [0, 0], ref[0][2][-3000:]
    resumed = _launch(tiny_model, run_dir, 2, layout, "--resume", "auto")
    assert [r[0] for r in resumed] == [0, 0], resumed[0][2][-3000:]
    assert _rows(run_dir) == _rows(ref_dir)
    row.update(lost=0, observed=row["observed"] + "; resumed: metrics = reference")


@pytest.mark.parametrize("mode", ["rollout.async_steps=0", "rollout.async_steps=1"],
                         ids=["sync", "async"])  # fmt: skip
def test_killed_engine_fails_clearly_before_training_on_the_batch(
    tiny_model, tmp_path, fault_row, mode
):
    asynchronous = mode.endswith("1")
    batch = 3 if asynchronous else 2  # async: batch 3 is generated during step 2
    row = fault_row(f"2 kill -9 of the engine process ({'async' if asynchronous else 'sync'})",
                    f"mid-generate of batch {batch}",
                    "clear failure, phase named; no half batch; resume exact")  # fmt: skip
    extra = ("rollout.local_process=true", mode, f"train.steps={batch}")
    run_dir, ref_dir = str(tmp_path / "run"), str(tmp_path / "ref")
    env = {"RLRT_FAULT_INJECT": f"kill9_engine@{batch}"}
    ((rc, end, err),) = _launch(tiny_model, run_dir, 1, *extra, "--resume", "none", env=env)
    assert rc == 1, err[-3000:]
    # in `rollout` (waiting for the batch), or at the engine's next call, the weight `sync`,
    # when the tiny model finished the batch before the kill landed; async with the local
    # engine, batch 3 is generated while step 2 trains: the checkpoint of step 2, which saves
    # batch 3 whole, is the first to wait for it and is not written
    found = re.search(r"phase '(rollout|sync|checkpoint)' failed", err)
    assert found, err[-3000:]
    phase = found.group(1)
    assert "the rollout process died (exit code -9)" in err
    detect = end - _injected_at(err)
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert ckpts == ["iter_0000001", "latest"], ckpts
    if phase == "checkpoint":
        assert asynchronous, err[-3000:]
        assert f"the checkpoint of step 2 needs batch {batch}" in err, err[-3000:]
        assert sorted(_rows(run_dir)) == [1, 2]  # step 2 trained on batch 2, then not saved
        seen = "RolloutProcessError in 'checkpoint' of step 2 (exit code -9); iter_1 latest"
    else:
        assert sorted(_rows(run_dir)) == [1]  # the step whose batch was cut short never trained
        seen = f"RolloutProcessError in '{phase}' (exit code -9); only step 1 logged"
    row.update(exit=rc, detect_s=round(detect, 1), observed=seen)
    ((rc, _, err),) = _launch(tiny_model, ref_dir, 1, *extra, "--resume", "none")
    assert rc == 0, err[-3000:]
    ((rc, _, err),) = _launch(tiny_model, run_dir, 1, *extra, "--resume", "auto")
    assert rc == 0, err[-3000:]
    assert _rows(run_dir) == _rows(ref_dir)
    row.update(lost=0, observed=row["observed"] + "; resumed: metrics = reference")
