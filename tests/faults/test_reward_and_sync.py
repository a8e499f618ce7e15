"""Case 3, a reward worker killed or hung: that sample scores 0 and is counted, the others are
scored, the call returns (the step continues); case 9, a stale engine (a weight push dropped):
the sync check stops the step naming both weight versions (the scenario of
tests/e2e/test_sync_check.py, recorded as a table row here)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from dist_utils import run_distributed

pytestmark = pytest.mark.faults

# sympy spends minutes in GMP on this: the worker hangs until its deadline
POWER_TOWER = r"so the answer is \boxed{9^{9^{9^{9^9}}}}"


def test_hung_reward_worker_scores_zero_and_is_counted(fault_row):
    from rlrt_megatron.reward.math import MathReward

    row = fault_row("3 reward worker hung", "math-verify on one sample",
                    "that sample scores 0, counted; others scored")  # fmt: skip
    with MathReward(timeout_s=2.0, num_workers=1) as reward:
        reward.wait_ready()
        t0 = time.monotonic()
        res = reward.score([POWER_TOWER, r"\boxed{4}", r"\boxed{5}"], ["0", "4", "4"])
        took = time.monotonic() - t0
    assert res.scores == [0.0, 1.0, 0.0] and res.n_timeout == 1, res
    row.update(exit="-", detect_s=round(took, 1), lost=0,
               observed="scores [0, 1, 0], n_timeout=1, worker replaced")  # fmt: skip


def test_killed_reward_worker_scores_zero_and_is_counted(fault_row):
    from rlrt_megatron.reward.math import MathReward

    row = fault_row("3 reward worker killed", "kill -9 mid-sample (twice)",
                    "that sample scores 0, counted; others scored")  # fmt: skip
    with MathReward(timeout_s=20.0, num_workers=1) as reward:
        reward.wait_ready()
        killed: list[int] = []

        def kill_busy() -> None:  # the worker scoring POWER_TOWER, and its replacement
            while len(killed) < 2:
                w = reward._workers[0]
                if w.task is not None and w.proc.pid not in killed:
                    time.sleep(0.2)
                    killed.append(w.proc.pid)
                    os.kill(w.proc.pid, signal.SIGKILL)
                time.sleep(0.01)

        t = threading.Thread(target=kill_busy, daemon=True)
        t.start()
        t0 = time.monotonic()
        res = reward.score([POWER_TOWER, r"\boxed{4}"], ["0", "4"])
        took = time.monotonic() - t0
        t.join(timeout=5)
        assert reward.health()
    assert len(killed) == 2
    assert res.scores == [0.0, 1.0] and res.n_error == 1 and res.n_timeout == 0, res
    row.update(exit="-", detect_s=round(took, 1), lost=0,
               observed="retried once, then scores 0, n_error=1; other scored 1")  # fmt: skip


def test_stale_engine_stops_the_step_naming_both_versions(tiny_model, tmp_path, fault_row):
    from test_sync_check import _train  # tests/e2e

    row = fault_row("9 stale engine (weight push dropped)", "sync of version 2",
                    "sync check stops the step naming both versions")  # fmt: skip
    (out,) = run_distributed(_train, 1, tiny_model, str(tmp_path / "miss"), "no_sync", [])
    err = out.get("error", "")
    assert err.startswith("SyncCheckError") and "weights version 1..1" in err, out
    assert "trainer holds version 2" in err and "step 3" in err
    row.update(exit="1", detect_s="step 3 (first use)", lost=0,
               observed="SyncCheckError: engine v1..1, trainer v2")  # fmt: skip
