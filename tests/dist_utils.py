"""Run a function in N real processes with torch.distributed (gloo) env vars set.

Each worker gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT like torchrun gives,
so code under test initialises through `rlrt_megatron.platform` exactly as in production.
Results come back pickled through a file per rank; an exception in any rank fails the caller
with that rank's traceback.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        payload = ("error", traceback.format_exc())
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    if payload[0] == "error":
        raise SystemExit(1)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """Spawn `world_size` processes running `fn(rank, world_size, *args)`; return their results.

    `fn` must be importable (module level) so that spawn can pickle it.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        ctx = mp.start_processes(
            _worker,
            args=(world_size, port, out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        errors = []
        try:
            import time

            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test did not finish within {timeout}s")
        except mp.ProcessRaisedException as e:  # pragma: no cover - surfaced below
            errors.append(str(e))
        except mp.ProcessExitedException as e:
            errors.append(str(e))
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                results.append(None)
                errors.append(f"rank {rank} wrote no result")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
            results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234) -> Iterator[None]:
    """This process as a 1-rank job (torchrun-style variables on a free port) with megatron's
    parallel state initialised at TP = PP = 1; everything restored afterwards."""
    from rlrt_megatron import platform

    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        platform.init_distributed(tp=1, pp=1, seed=seed)
        yield
    finally:
        platform.destroy_distributed()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
