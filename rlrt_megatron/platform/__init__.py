"""Device choice, distributed initialisation and every CPU shim megatron-core needs.

One place decides where tensors live and how processes talk:

* GPU present -> device ``cuda:<LOCAL_RANK>``, backend ``nccl``; no shim is installed. More
  ranks on a node than visible GPUs is refused at start (one GPU per rank).
* no GPU, or ``RLRT_DEVICE=cpu`` -> device ``cpu``, backend ``gloo``, and
  :func:`apply_cpu_shims` makes megatron-core 0.16 run on CPU (it was written for CUDA and
  allocates on ``"cuda"`` in many places).

Process topology comes from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``), from Slurm (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/
``SLURM_JOB_NODELIST``/``SLURM_JOB_ID``) or, when neither is set, a single local process.

This package imports megatron lazily (inside functions, in env.py and cpu_shims.py too) so that
``rlrt_megatron.platform`` can be imported by code that must not pull megatron in.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch

from rlrt_megatron.platform.cpu_shims import (
    DISTRIBUTED_OPTIMIZER_ON_CPU,
    TENSOR_TYPE_SHIM,
    apply_cpu_shims,
)
from rlrt_megatron.platform.env import (
    DEVICE_ENV,
    DTYPES,
    DistInfo,
    _cuda_ordinal,
    _local_world_size,
    backend,
    first_slurm_host,
    is_cpu_mode,
    resolve_dist_env,
    resolve_dtype,
    set_deterministic,
    strict_determinism,
)

__all__ = [
    "DistInfo",
    "apply_cpu_shims",
    "backend",
    "destroy_distributed",
    "device",
    "device_name",
    "init_distributed",
    "is_cpu_mode",
    "resolve_dist_env",
    "resolve_dtype",
    "set_deterministic",
    "strict_determinism",
]

# re-exported from env.py / cpu_shims.py for callers and tests
_REEXPORTED = (DEVICE_ENV, DTYPES, DISTRIBUTED_OPTIMIZER_ON_CPU, TENSOR_TYPE_SHIM, _cuda_ordinal,
               _local_world_size, first_slurm_host)  # fmt: skip


def device() -> torch.device:
    """The device this process computes on (``cpu`` or ``cuda:<LOCAL_RANK>``)."""
    if _DIST_INFO is not None:
        return _DIST_INFO.device
    if is_cpu_mode():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return torch.device("cuda", _cuda_ordinal(local_rank))


def device_name() -> str:
    """What :func:`device` is, in words: ``"CPU"`` or the GPU's name (``"NVIDIA H200"``)."""
    dev = device()
    return "CPU" if dev.type == "cpu" else torch.cuda.get_device_name(dev)


# ----------------------------------------------------------------------------------------------
# Distributed init
# ----------------------------------------------------------------------------------------------

_DIST_INFO: DistInfo | None = None
_OWNS_PROCESS_GROUP = False


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    timeout_s: float = 1800,
    vpp: int | None = None,
) -> DistInfo:
    """Initialise torch.distributed, megatron ``parallel_state`` and the model-parallel RNG.

    Idempotent: a second call with the same ``tp``/``pp`` returns the same :class:`DistInfo`.
    A call with different ``tp``/``pp`` keeps the process group and rebuilds megatron's
    model-parallel groups (useful for tests that compare layouts in one set of processes).

    ``vpp`` is the number of virtual pipeline stages per rank (interleaved schedule), or None.
    Raises ``ValueError`` when ``world_size`` is not a multiple of ``tp * pp``.
    """
    global _DIST_INFO, _OWNS_PROCESS_GROUP
    import torch.distributed as dist

    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")

    denv = resolve_dist_env()
    be = backend()
    if be == "nccl":
        torch.cuda.set_device(_cuda_ordinal(denv.local_rank))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        apply_cpu_shims()
        dev = torch.device("cpu")

    if not dist.is_initialized():
        dist.init_process_group(
            backend=be,
            init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        _OWNS_PROCESS_GROUP = True
    world_size = dist.get_world_size()
    rank = dist.get_rank()
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world_size={world_size} is not divisible by tp*pp={tp}*{pp}={tp * pp}: choose "
            f"parallel.tp/parallel.pp whose product divides the number of processes"
        )

    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_virtual_pipeline_model_parallel_world_size() == vpp
        )
        if same and _DIST_INFO is not None:
            return _DIST_INFO
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )
    # Megatron's recipe (megatron/training/initialize.py:_set_random_seed): the default generator
    # gets `seed` (same on every rank, so replicated init agrees), the tracker gets the TP-rank
    # offset seeds used inside `get_cuda_rng_tracker().fork()`.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    _DIST_INFO = DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=denv.local_rank,
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
        backend=be,
        device=dev,
        master_addr=denv.master_addr,
        master_port=denv.master_port,
        source=denv.source,
    )
    return _DIST_INFO


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel groups and the process group this module created."""
    global _DIST_INFO, _OWNS_PROCESS_GROUP
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except ImportError:  # pragma: no cover - megatron is a core dependency
        pass
    if dist.is_initialized() and _OWNS_PROCESS_GROUP:
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
    _DIST_INFO = None
