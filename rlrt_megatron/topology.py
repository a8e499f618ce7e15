"""Where this process sits in the job, from its environment: rank, world size, local rank and the
rendezvous address, from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``), from Slurm (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/
``SLURM_JOB_NODELIST``/``SLURM_JOB_ID``) or, when neither is set, a single local process.
Pure parsing: no torch, no megatron (`rlrt_megatron.platform` initialises from it)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

__all__ = ["first_slurm_host", "local_world_size", "one_gpu_per_task", "resolve_dist_env"]


@dataclass(frozen=True)
class _DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``.

    Handles the compressed bracket syntax without calling ``scontrol`` (which may not exist in
    the container the job runs in).
    """
    nodelist = nodelist.strip()
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def resolve_dist_env(env: dict[str, str] | None = None) -> _DistEnv:
    """Read rank / world size / rendezvous address from torchrun or Slurm variables.

    Precedence: torchrun (``RANK`` and ``WORLD_SIZE``) > Slurm (``SLURM_PROCID`` and
    ``SLURM_NTASKS``) > a single local process on a free port.
    Under Slurm the port is ``MASTER_PORT`` if set, else ``20000 + SLURM_JOB_ID % 20000`` so all
    tasks of a job agree on it without communicating.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return _DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            raise RuntimeError(
                "Slurm task without MASTER_ADDR or SLURM_JOB_NODELIST: set MASTER_ADDR to the "
                "first node's hostname in the sbatch script"
            )
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        elif "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        else:
            raise RuntimeError("Slurm task without MASTER_PORT or SLURM_JOB_ID: set MASTER_PORT")
        return _DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=port,
            source="slurm",
        )
    return _DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=int(env.get("MASTER_PORT", "0")) or _free_port(),
        source="single",
    )


def local_world_size(env: dict[str, str] | None = None) -> int:
    """Processes of this job on this node (torchrun ``LOCAL_WORLD_SIZE``, Slurm
    ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``), or 1 when unknown."""
    env = dict(os.environ if env is None else env)
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").strip().isdigit():
            return int(env[key])
    tpn = env.get("SLURM_TASKS_PER_NODE", "")  # e.g. "4(x2)" or "4,3"
    m = re.match(r"^(\d+)", tpn)
    return int(m.group(1)) if m else 1


def one_gpu_per_task(env: dict[str, str] | None = None) -> bool:
    """True when Slurm bound one GPU to each task (``--gpus-per-task=1``): each task then
    sees a single device, ordinal 0."""
    env = dict(os.environ if env is None else env)
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    bound = bool(env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"))
    return bound and bool(visible) and "," not in visible
