"""Where this process runs, read from its environment: the device request (`RLRT_DEVICE`),
CUDA or CPU, the GPU of each local rank (one per rank), the dtype `auto` means, and the process
topology from torchrun or Slurm variables. Megatron is imported only inside `DistInfo`'s
properties."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# Device / backend
# ----------------------------------------------------------------------------------------------


DEVICE_ENV = "RLRT_DEVICE"


def _device_request() -> str:
    """``RLRT_DEVICE``: ``auto`` (default: CUDA when available), ``cpu`` or ``cuda``."""
    want = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={want!r}: must be auto, cpu or cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{DEVICE_ENV}=cuda but torch sees no CUDA device (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); unset {DEVICE_ENV} to run on the CPU"
        )
    return want


def is_cpu_mode() -> bool:
    """True when everything runs on CPU with gloo: no usable CUDA device, or ``RLRT_DEVICE=cpu``
    (forces the CPU path, shims included, on a GPU machine)."""
    return _device_request() == "cpu" or not torch.cuda.is_available()


def set_deterministic() -> None:
    """Deterministic kernels on GPUs (bit-identical reruns and resumes; slower).

    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first handle is created, so call this
    before any matrix product runs (and before the process group: ``NCCL_ALGO=Ring``, since
    NVLS / CollNet reductions are not bit-reproducible). Transformer Engine's attention backward
    is deterministic with ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0``. Globally, ops without a
    deterministic CUDA kernel only warn (the sampler's float ``cumsum`` on CUDA has none); the
    training forward/backward runs under :func:`strict_determinism`, where PyTorch picks the
    deterministic SDPA flash / memory-efficient backward (it does not while ``warn_only``) and an
    op without one raises. A no-op on CPU, whose kernels are deterministic already.
    """
    if is_cpu_mode():
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    os.environ.setdefault("NCCL_ALGO", "Ring")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def strict_determinism() -> Iterator[None]:
    """While active, deterministic mode (when :func:`set_deterministic` turned it on) is strict
    instead of warn-only: the backward of the ops run inside picks deterministic kernels."""
    if not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


def backend() -> str:
    """The torch.distributed backend for this machine: ``"gloo"`` on CPU, ``"nccl"`` on GPU."""
    return "gloo" if is_cpu_mode() else "nccl"


def _local_world_size(env: dict[str, str] | None = None) -> int:
    """Processes of this job on this node (torchrun ``LOCAL_WORLD_SIZE``, Slurm
    ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``), or 1 when unknown."""
    env = dict(os.environ if env is None else env)
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").strip().isdigit():
            return int(env[key])
    tpn = env.get("SLURM_TASKS_PER_NODE", "")  # e.g. "4(x2)" or "4,3"
    m = re.match(r"^(\d+)", tpn)
    return int(m.group(1)) if m else 1


def _cuda_ordinal(local_rank: int, env: dict[str, str] | None = None) -> int:
    """The GPU of local rank ``local_rank``: one GPU per rank, never shared.

    With one visible GPU per task (``srun --gpus-per-task=1``, or ``CUDA_VISIBLE_DEVICES`` set
    per rank) every task uses ordinal 0. Otherwise ranks beyond the visible GPUs would silently
    stack on ``cuda:0`` (wrong memory, NCCL errors much later): refuse at start instead.
    """
    n_gpus = torch.cuda.device_count()
    local_world = _local_world_size(env)
    if n_gpus == 1 and _one_gpu_per_task(env):
        return 0
    if local_world > n_gpus or local_rank >= n_gpus:
        raise RuntimeError(_too_few_gpus(max(local_world, local_rank + 1), n_gpus))
    return local_rank


def _one_gpu_per_task(env: dict[str, str] | None = None) -> bool:
    """True when Slurm bound one GPU to each task (``--gpus-per-task=1``): each task then
    sees a single device, ordinal 0."""
    env = dict(os.environ if env is None else env)
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    bound = bool(env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"))
    return bound and bool(visible) and "," not in visible


def _too_few_gpus(ranks: int, n_gpus: int) -> str:
    return (
        f"{ranks} ranks on this node but only {n_gpus} visible GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
        f"start at most {n_gpus} processes per node (torchrun --nproc-per-node {n_gpus}), "
        f"or set {DEVICE_ENV}=cpu to run every rank on the CPU with gloo"
    )


# ----------------------------------------------------------------------------------------------
# Environment -> topology
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (all sizes are numbers of ranks)."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    backend: str
    device: torch.device
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def tp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """A config dtype: `float32`, `bfloat16`, or `auto` = bfloat16 on a GPU, float32 on CPU."""
    if name == "auto":
        return torch.float32 if is_cpu_mode() else torch.bfloat16
    return DTYPES[name]
