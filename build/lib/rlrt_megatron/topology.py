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

__all__ = [
    "first_slurm_host",
    "interface_address",
    "local_world_size",
    "one_gpu_per_task",
    "resolve_dist_env",
    "sync_address",
]


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


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (e.g. ``ib0``, ``eth0``; Linux)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        except OSError as e:  # SIOCGIFADDR: no such interface, or no IPv4 address on it
            raise ValueError(
                f"network interface {name!r}: no IPv4 address here ({e.strerror}); list them "
                "with `ip -4 addr` and set RLRT_NET_IF / rollout.sglang_master_address"
            ) from e
    return socket.inet_ntoa(packed[20:24])


def sync_address(value: str | None = None, env: dict[str, str] | None = None) -> str:
    """The address remote SGLang servers reach this trainer at (the weight-sync NCCL group).

    `value` (``rollout.sglang_master_address``): an address or host name, or ``iface:NAME`` for
    the IPv4 address of interface NAME. Empty: the interface named in ``RLRT_SYNC_IFNAME`` (set
    by slurm/launch.sh from ``RLRT_NET_IF``, e.g. the InfiniBand/IPoIB one), else the address
    this host's name resolves to (which may be a management network's).
    """
    env = dict(os.environ if env is None else env)
    if value and value.startswith("iface:"):
        return interface_address(value.removeprefix("iface:"))
    if value:
        return value
    if env.get("RLRT_SYNC_IFNAME"):
        return interface_address(env["RLRT_SYNC_IFNAME"])
    return socket.gethostbyname(socket.gethostname())
