"""Every CPU shim megatron-core needs, in one module: active only when no GPU is used
(`rlrt_megatron.platform.is_cpu_mode()`), installed by `init_distributed` through
:func:`apply_cpu_shims`. Each shim and the reason for it are listed in that function."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types
from typing import Any

import torch

from rlrt_megatron.platform.env import is_cpu_mode

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# CPU shims for megatron-core 0.16 (active only without a GPU)
# ----------------------------------------------------------------------------------------------

_SHIMS_APPLIED = False

# Capabilities of the CPU shims, for callers that used to work around their absence:
# `Tensor.type()` answers megatron's `torch.cuda.*Tensor` checks, so megatron's optimizers, grad
# clipping and the DistributedOptimizer run on CPU (tests/distributed/test_parallel_invariance.py
# steps the DistributedOptimizer under TP=2 and PP=2).
TENSOR_TYPE_SHIM = True
DISTRIBUTED_OPTIMIZER_ON_CPU = True

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

    _SHIMS_APPLIED = True


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

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _NullEvent:
    """CPU stand-in for ``torch.cuda.Event`` (timers): elapsed time is measured on the host."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t = 0.0

    def record(self, stream: Any = None) -> None:
        import time

        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _NullEvent) -> float:
        return (end._t - self._t) * 1000.0


def _nullcontext() -> Any:
    return contextlib.nullcontext()
