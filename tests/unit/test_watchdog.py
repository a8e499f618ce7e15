"""The phase watchdog: a stalled phase dumps stacks, names the phase and exits non-zero."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from rlrt_megatron.trainer.watchdog import EXIT_CODE, Watchdog

SCRIPT = textwrap.dedent(
    """
    import time, sys
    from rlrt_megatron.trainer.watchdog import Watchdog

    def stuck_in_rollout():
        time.sleep(60)

    wd = Watchdog({"rollout": 0.5, "reward": 60}, rank=0, log_dir=sys.argv[1])
    with wd.phase("reward"):
        pass
    with wd.phase("rollout"):
        stuck_in_rollout()
    print("unreachable")
    """
)


def test_expired_phase_dumps_stack_and_exits(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_CODE
    assert "unreachable" not in proc.stdout
    assert "phase 'rollout' did not finish within 0.5s (timeouts.rollout)" in proc.stderr
    assert "stuck_in_rollout" in proc.stderr  # the stalled frame is in the dump
    log = (tmp_path / "watchdog_rank0.log").read_text()
    assert "phase 'rollout'" in log and "stuck_in_rollout" in log


def test_phases_that_finish_do_not_fire():
    wd = Watchdog({"a": 0.2}, rank=0)
    for _ in range(5):
        with wd.phase("a"):
            pass
    with wd.phase("b", timeout=5):
        with wd.phase("a"):
            assert wd.current_phase == "a"
        assert wd.current_phase == "b"
    assert wd.current_phase is None
    wd.close()
