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

Megatron is imported lazily (in functions): device helpers need no megatron. The process
topology (torchrun / Slurm variables) is read by :mod:`rlrt_megatron.topology`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from rlrt_megatron.topology import (
    first_slurm_host,
    local_world_size,
    one_gpu_per_task,
    resolve_dist_env,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DistInfo", "apply_cpu_shims", "backend", "destroy_distributed", "device", "device_name",
    "first_slurm_host", "init_distributed", "is_cpu_mode", "resolve_dist_env", "resolve_dtype",
    "set_deterministic", "strict_determinism",
]  # fmt: skip


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


def _cuda_ordinal(local_rank: int, env: dict[str, str] | None = None) -> int:
    """The GPU of local rank ``local_rank``: one GPU per rank, never shared.

    With one visible GPU per task (``srun --gpus-per-task=1``, or ``CUDA_VISIBLE_DEVICES`` set
    per rank) every task uses ordinal 0. Otherwise ranks beyond the visible GPUs would silently
    stack on ``cuda:0`` (wrong memory, NCCL errors much later): refuse at start instead.
    """
    n_gpus = torch.cuda.device_count()
    local_world = local_world_size(env)
    if n_gpus == 1 and one_gpu_per_task(env):
        return 0
    if local_world > n_gpus or local_rank >= n_gpus:
        raise RuntimeError(_too_few_gpus(max(local_world, local_rank + 1), n_gpus))
    return local_rank


def _too_few_gpus(ranks: int, n_gpus: int) -> str:
    return (
        f"{ranks} ranks on this node but only {n_gpus} visible GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
        f"start at most {n_gpus} processes per node (torchrun --nproc-per-node {n_gpus}), "
        f"or set {DEVICE_ENV}=cpu to run every rank on the CPU with gloo"
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """A config dtype: `float32`, `bfloat16`, or `auto` = bfloat16 on a GPU, float32 on CPU."""
    if name == "auto":
        return torch.float32 if is_cpu_mode() else torch.bfloat16
    return DTYPES[name]


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
    ep: int = 1,
    etp: int | None = None,
) -> DistInfo:
    """Initialise torch.distributed, megatron ``parallel_state`` and the model-parallel RNG.

    Idempotent: a second call with the same ``tp``/``pp`` returns the same :class:`DistInfo`.
    A call with different ``tp``/``pp`` keeps the process group and rebuilds megatron's
    model-parallel groups (useful for tests that compare layouts in one set of processes).

    ``vpp``: virtual pipeline stages per rank (interleaved schedule) or None; ``ep`` / ``etp``:
    expert (tensor) parallel sizes of a MoE model (etp None = tp), checked by megatron.
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
            and parallel_state.get_expert_model_parallel_world_size() == ep
            and parallel_state.get_expert_tensor_parallel_world_size() == (etp or tp)
        )
        if same and _DIST_INFO is not None:
            return _DIST_INFO
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
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


# ----------------------------------------------------------------------------------------------
# CPU shims for megatron-core 0.16 (active only without a GPU)
# ----------------------------------------------------------------------------------------------

_SHIMS_APPLIED = False

# Megatron modules that allocate with a literal `device="cuda"` (or `pin_memory=True`) on code paths
# a dense GPT model uses for forward/backward, the schedules, DDP, the optimizer and checkpoints.
# Their module-global `torch` is swapped for a proxy whose tensor factories put "cuda" on the CPU.
_CUDA_LITERAL_MODULES = (
    "megatron.core.transformer.utils",  # get_default_causal_mask / sliding-window mask
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens counters
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.tensor_parallel.data",  # broadcast_data
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

# Tensor factories that take `device=` / `pin_memory=` keyword arguments.
_FACTORIES = frozenset(
    {
        "arange", "as_tensor", "empty", "empty_like", "empty_strided", "eye", "full", "full_like",
        "linspace", "ones", "ones_like", "rand", "rand_like", "randint", "randn", "randn_like",
        "randperm", "tensor", "zeros", "zeros_like",
    }
)  # fmt: skip


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, int):  # a bare int means a CUDA ordinal to torch
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def _cpu_factory(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # pinning needs an accelerator
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorchProxy(types.ModuleType):
    """Stands in for ``torch`` in one megatron module: factories put ``"cuda"`` tensors on CPU.

    Scoped per module (instead of patching ``torch.zeros`` globally or a TorchFunctionMode, which
    is thread-local and disabled inside autograd.Function bodies) so only megatron's hard-coded
    allocations change; every other attribute is the real ``torch`` one.
    """

    def __init__(self) -> None:
        super().__init__("torch", "CPU proxy for torch installed by rlrt_megatron.platform")
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            return self._cache.setdefault(name, _cpu_factory(attr))
        return attr


def _cpu_rng_tracker_class(base: type) -> type:
    """Megatron's ``CudaRNGStatesTracker`` (``base``) with its semantics on the CPU generator."""

    class CpuRNGStatesTracker(base):  # type: ignore[misc,valid-type]
        """Named RNG states swapped into ``torch.default_generator`` by ``fork``.

        Megatron keeps named CUDA generator states (data-parallel, model-parallel, expert) and
        ``fork(name)`` swaps the *device* generator to that state, so TP-sharded init/dropout
        differ per TP rank while replicated ops stay identical. On CPU the generator ops draw
        from is ``torch.default_generator``, so ``fork`` swaps that one. ``get_states``,
        ``set_states`` and ``reset`` are megatron's.
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng"):  # noqa: ANN201
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def apply_cpu_shims() -> None:
    """Make megatron-core 0.16.1 run on CPU under gloo. Idempotent; a no-op when a GPU exists.

    Each shim, and why:

    1. ``torch.cuda.current_device()`` -> ``torch.device("cpu")``: megatron passes it as
       ``device=`` for every buffer it allocates (TP all-gathers, p2p shapes, rotary freqs).
    2. ``torch.cuda.synchronize`` / ``current_stream`` / ``Stream`` / ``Event`` / memory stats ->
       no-ops or CPU equivalents: used for timers, overlap and logging only.
    3. ``Tensor.cuda()`` -> the tensor itself: ``LanguageModule.setup_embeddings_and_output_layer``
       moves the tied output weight with ``.cuda()`` on the last PP stage. ``Tensor.type()``
       (no argument) answers ``"torch.cuda.FloatTensor"``-style names to callers inside megatron
       only: its optimizers and grad clipping dispatch on those strings.
    4. Module-level ``torch`` of the modules in ``_CUDA_LITERAL_MODULES`` -> a proxy mapping
       ``device="cuda"`` to CPU (causal mask, token counters in the schedules, grad buffers...).
    5. RNG: ``tensor_parallel.random._get/_set_cuda_rng_state`` -> the CPU generator, and the
       tracker class -> ``CpuRNGStatesTracker`` (``torch.cuda.get_rng_state`` cannot run).
    6. MoE alltoall dispatcher: its token split sizes become numpy arrays (megatron converts only
       CUDA tensors; ``all_to_all_single`` on gloo takes int sequences, not tensors).
    7. Uneven sequence-parallel all-gather (the MoE dispatcher's tokens over the expert-TP
       group): gloo's list ``all_gather`` needs equal sizes, :func:`_uneven_gather` pads them.
    """
    global _SHIMS_APPLIED
    if _SHIMS_APPLIED or not is_cpu_mode():
        return
    import importlib
    import warnings

    # Expected on a CPU machine, repeated by every megatron module at import: not actionable.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    warnings.filterwarnings("ignore", message=r"Apex is not installed.*")
    cpu = torch.device("cpu")

    # 1-2. torch.cuda entry points megatron calls unconditionally.
    torch.cuda.current_device = lambda: cpu  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.current_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    torch.cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NullEvent  # type: ignore[assignment,misc]
    torch.cuda.stream = lambda stream=None: _nullcontext()  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.memory_reserved = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.max_memory_reserved = lambda device=None: 0  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]

    # 3. `.cuda()` on CPU tensors.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment,method-assign]

    # 3b. Megatron's optimizers test `param.type() == "torch.cuda.FloatTensor"` (and Half/BFloat16)
    # to pick the fp32 / mixed-precision path. Answer with the CUDA name only to megatron callers.
    torch.Tensor.type = _megatron_tensor_type  # type: ignore[method-assign]

    # 4. Hard-coded device="cuda" allocations.
    proxy = _CpuTorchProxy()
    for name in _CUDA_LITERAL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover - module moved in another megatron version
            logger.debug("cpu shim: %s not importable, skipped", name)
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy

    # 5. RNG tracker on the CPU generator.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    cpu_tracker = _cpu_rng_tracker_class(mrandom.CudaRNGStatesTracker)
    mrandom.CudaRNGStatesTracker = cpu_tracker
    # A tracker created before the shim would hold the CUDA class: rebuild it on next use.
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False

    # 6. MoE token split sizes.
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = lambda t, as_numpy=False, record_stream=False: (
        t.numpy() if as_numpy and torch.is_tensor(t) else t
    )
    # 7. Uneven all-gather (gloo reduce-scatters uneven rows itself, from torch 2.8).
    from megatron.core.tensor_parallel import mappings as tpm

    tpm._gather_along_first_dim = functools.partial(_uneven_gather, tpm._gather_along_first_dim)
    _SHIMS_APPLIED = True


def _uneven_gather(even: Any, x: torch.Tensor, group: Any, output_split_sizes: Any = None,
                   use_global_buffer: bool = False) -> torch.Tensor:  # fmt: skip
    """Megatron's ``_gather_along_first_dim`` (``even``) of uneven rows on gloo: every rank's
    rows padded to the largest count, gathered as one tensor, unpadded."""
    if output_split_sizes is None or group.size() == 1:
        return even(x, group, output_split_sizes, use_global_buffer)
    most = max(sizes := [int(n) for n in output_split_sizes])
    out = x.new_empty((most * len(sizes), *x.shape[1:]))
    padded = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
    torch.distributed.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[i * most : i * most + n] for i, n in enumerate(sizes)])


_ORIG_TENSOR_TYPE = torch.Tensor.type


def _megatron_tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw):
    """``Tensor.type`` that reports CPU tensors as ``torch.cuda.*`` to megatron code only."""
    if dtype is None and not kw and self.device.type == "cpu":
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("megatron."):
            return _ORIG_TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kw)


class _NullStream:
    """CPU stand-in for ``torch.cuda.Stream``: work is synchronous, waiting is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    wait_stream = wait_event = synchronize = __exit__ = lambda self, *args: None

    def record_event(self, event: Any = None) -> _NullEvent:
        return event or _NullEvent()

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self


class _NullEvent:
    """CPU stand-in for ``torch.cuda.Event`` (timers): elapsed time is measured on the host."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t = 0.0

    def record(self, stream: Any = None) -> None:
        import time

        self._t = time.perf_counter()

    synchronize = wait = lambda self, stream=None: None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _NullEvent) -> float:
        return (end._t - self._t) * 1000.0


def _nullcontext() -> Any:
    return contextlib.nullcontext()
