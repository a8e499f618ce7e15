"""A stalled rank inside `update`: every rank's watchdog fires, names the phase, dumps stacks."""

from __future__ import annotations

import os
import time

import pytest
from dist_utils import run_distributed

pytestmark = pytest.mark.distributed


def _injected_stall() -> None:
    time.sleep(120)


def _stalled_update(rank: int, world_size: int, log_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from rlrt_megatron.trainer.watchdog import Watchdog

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world_size,
    )
    wd = Watchdog({"update": 3.0}, rank=rank, log_dir=log_dir)
    with wd.phase("update"):
        if rank == 1:
            _injected_stall()
        t = torch.ones(1)
        dist.all_reduce(t)  # rank 0 waits here for rank 1 forever without the watchdog


def test_stalled_rank_names_phase_and_dumps_all_stacks(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError) as err:
        run_distributed(_stalled_update, 2, str(tmp_path), timeout=90)
    assert "wrote no result" in str(err.value)  # both ranks exited non-zero via os._exit
    assert time.monotonic() - start < 90
    for rank in (0, 1):
        log = (tmp_path / f"watchdog_rank{rank}.log").read_text()
        assert f"rank {rank}: phase 'update' did not finish within 3s (timeouts.update)" in log
        assert "_stalled_update" in log
    assert "_injected_stall" in (tmp_path / "watchdog_rank1.log").read_text()
    assert "all_reduce" in (tmp_path / "watchdog_rank0.log").read_text()
