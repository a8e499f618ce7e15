"""Atomic, resumable checkpoints: Megatron dist_checkpointing + a small trainer state.

Layout of `<checkpoint_dir>`::

    iter_0000012/
        dist/                    model (+ teacher copy) and optimizer, Megatron dist checkpoint
        trainer_state.json       step, data cursor, schedules, rollout version (rank 0)
        rng_rank<R>.pt           python / numpy / torch / megatron tracker RNG states (per rank)
        config.json              the run's TrainConfig
        hf/                      the HF config / tokenizer files (for `megatron-to-hf`)
    latest                       text file: "iter_0000012"

Atomicity: every rank writes into `iter_N.tmp/`; after a barrier rank 0 fsyncs the files, renames
the directory to `iter_N/` and only then replaces `latest` (tmp file + `os.replace`). A crash (even
`kill -9`) at any point leaves `latest` naming a complete checkpoint; a stale `*.tmp` directory is
ignored and removed by the next save. `keep_last` prunes older complete checkpoints.

Preemption: `SignalFlag` turns SIGTERM / SIGUSR1 into a flag the loop checks at its safe point
(end of a step); all ranks agree through an all-reduce, save, and exit 0 (Slurm requeues).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlrt_megatron.convert.io import copy_hf_metadata
from rlrt_megatron.convert.load import model_sharded_state_dict, unwrap

ITER_RE = re.compile(r"^iter_(\d{7})$")
LATEST = "latest"


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            _fsync_path(os.path.join(d, f))
        _fsync_path(d)


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a fsynced tmp file and `os.replace`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


# ---- RNG ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, including Megatron's model-parallel tracker."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # noqa: BLE001 - no tracker initialised (tools, unit tests)
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


# ---- sharded state ------------------------------------------------------------------------


def _load_model_state(chunks: Sequence[Any], state: dict, prefix: str = "") -> None:
    # `sharded_state_dict(prefix=...)` prefixes the dict keys too: strip it, or the teacher's
    # `load_state_dict(strict=False)` would match nothing and silently keep its weights
    names = (
        [f"{prefix}model"]
        if len(chunks) == 1
        else [f"{prefix}model{i}" for i in range(len(chunks))]
    )
    for c, name in zip(chunks, names, strict=True):
        sd = {k.removeprefix(prefix): v for k, v in state[name].items()}
        unwrap(c).load_state_dict(sd, strict=False)


def _ensure_optimizer_state(optimizer: Any) -> None:
    """A fresh DistributedOptimizer has no Adam state, and its `state_dict()` (called while
    building the sharded state to load into) asserts on it: give it placeholder state first, as
    megatron does for other sharding types (`_init_optimizer_states_with_dummy_values`; the
    placeholders and the parameters are overwritten by the load)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


# Optimizer formats (megatron/compat.py): "dp_reshardable" (default; resume at the same data-
# parallel size) or "fully_reshardable" (any DP/TP/PP size; gathered on DP rank 0 at save);
# a load reads the format the checkpoint was written in.
def _inner_states(optimizer: Any) -> list[dict]:
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        out.extend(getattr(inner, "state", {}).values())
    return out


def adam_step(optimizer: Any) -> float | None:
    """The torch-Adam step count (bias correction) of the optimizer's parameters, if any."""
    steps = {float(st["step"]) for st in _inner_states(optimizer) if "step" in st}
    return max(steps) if steps else None


def set_adam_step(optimizer: Any, step: float) -> None:
    """Give every parameter its own `step` tensor equal to `step`.

    megatron-core 0.16's DistributedOptimizer.load_state_dict (torch Adam, no TE/Apex) leaves the
    placeholder steps in place (or one shared tensor, which Adam would then increment once per
    parameter): the step count is saved in the trainer state and restored here."""
    for st in _inner_states(optimizer):
        if "step" in st:
            st["step"] = torch.tensor(float(step), dtype=st["step"].dtype)


OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(
    model: Sequence[Any],
    optimizer: Any,
    teacher: Sequence[Any] | None,
    is_loading: bool,
    metadata: dict | None = None,
) -> dict:
    state = model_sharded_state_dict(model)
    if teacher is not None:
        state.update(model_sharded_state_dict(teacher, prefix="teacher."))
    if optimizer is not None:
        model_only = model_sharded_state_dict(model)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_only, is_loading=is_loading, metadata=metadata or OPTIMIZER_METADATA
        )
    return state


# ---- the checkpointer ---------------------------------------------------------------------


class Checkpointer:
    """Save / find / load checkpoints under `root` (collective: every rank calls save/load).

    Args:
        root: the checkpoint directory.
        keep_last: newest complete checkpoints to keep (0 = all).
        hf_dir: the run's Hugging Face model directory; its config / tokenizer files are copied
            to `iter_N/hf/` so `rlrt convert megatron-to-hf --ckpt iter_N/dist` needs no
            `--hf-config`.
    """

    def __init__(self, root: str, keep_last: int = 2, hf_dir: str | None = None) -> None:
        self.root = root
        self.keep_last = keep_last
        self.hf_dir = hf_dir
        self.optimizer_format = "dp_reshardable"  # or "fully_reshardable" (compat.py)
        # test hook: called after the shards are written, before the rename (kill -9 tests)
        self.before_commit: Callable[[str], None] | None = None

    # -- discovery ----------------------------------------------------------------------------
    def complete(self) -> list[str]:
        """Complete checkpoint directories, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if ITER_RE.match(n))
        return [
            os.path.join(self.root, n)
            for n in names
            if os.path.isfile(os.path.join(self.root, n, "trainer_state.json"))
        ]

    def latest(self) -> str | None:
        """The checkpoint `latest` names (falling back to the newest complete one)."""
        ptr = os.path.join(self.root, LATEST)
        if os.path.isfile(ptr):
            with open(ptr) as f:
                name = f.read().strip()
            path = os.path.join(self.root, name)
            if os.path.isfile(os.path.join(path, "trainer_state.json")):
                return path
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str) -> str | None:
        """`--resume auto|none|PATH` -> a checkpoint directory or None."""
        if resume in ("none", "", None):
            return None
        if resume == "auto":
            return self.latest()
        path = resume
        if os.path.isfile(os.path.join(path, LATEST)):
            path = Checkpointer(path).latest() or path
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise FileNotFoundError(
                f"checkpoint.resume={resume}: not a complete checkpoint (no trainer_state.json); "
                "pass an iter_N directory, a checkpoint root with a `latest` file, auto or none"
            )
        return path

    # -- save ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: Sequence[Any],
        optimizer: Any,
        trainer_state: dict[str, Any],
        *,
        teacher: Sequence[Any] | None = None,
        config: dict | None = None,
    ) -> str:
        """Write `iter_<step>` atomically and point `latest` at it; returns its path."""
        from rlrt_megatron.megatron import compat

        final = os.path.join(self.root, iter_name(step))
        tmp = final + ".tmp"
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if optimizer is not None:
            trainer_state = {**trainer_state, "optimizer_adam_step": adam_step(optimizer)}
        if _is_rank0():
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):  # stale tmp dirs of crashed saves
                if name.endswith(".tmp") and os.path.isdir(os.path.join(self.root, name)):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(os.path.join(tmp, "dist"))
        _barrier()
        meta = compat.optimizer_metadata(self.optimizer_format)
        state = _sharded_state(model, optimizer, teacher, is_loading=False, metadata=meta)
        compat.dist_save(state, os.path.join(tmp, "dist"))  # + who wrote it
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        _barrier()
        if _is_rank0():
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({**trainer_state, "step": step}, f, indent=1)
            if config is not None:
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(config, f, indent=1)
            if self.hf_dir:
                copy_hf_metadata(self.hf_dir, os.path.join(tmp, "hf"))
            _fsync_tree(tmp)
            if self.before_commit is not None:
                self.before_commit(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_path(self.root)
            write_atomic(os.path.join(self.root, LATEST), iter_name(step) + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for path in self.complete()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # -- load ---------------------------------------------------------------------------------
    def load(
        self,
        path: str,
        model: Sequence[Any],
        optimizer: Any,
        *,
        teacher: Sequence[Any] | None = None,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Load model (+ teacher) and optimizer in place; return the trainer state."""
        from rlrt_megatron.megatron import compat

        if optimizer is not None:
            _ensure_optimizer_state(optimizer)
        meta = compat.optimizer_load_metadata(os.path.join(path, "dist"))
        state = _sharded_state(model, optimizer, teacher, is_loading=True, metadata=meta)
        loaded = compat.dist_load(state, os.path.join(path, "dist"))  # any supported version
        _load_model_state(model, loaded)
        if teacher is not None:
            _load_model_state(teacher, loaded, prefix="teacher.")
        if optimizer is not None:
            compat.load_optimizer_state(optimizer, loaded["optimizer"])  # both formats
            with open(os.path.join(path, "trainer_state.json")) as f:
                step = json.load(f).get("optimizer_adam_step")
            if step is not None:
                set_adam_step(optimizer, step)
        with open(os.path.join(path, "trainer_state.json")) as f:
            trainer_state = json.load(f)
        if restore_rng:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            rng_file = os.path.join(path, f"rng_rank{rank}.pt")
            if os.path.isfile(rng_file):  # absent when resuming at another world size
                set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer_state


class SignalFlag:
    """SIGTERM / SIGUSR1 -> a flag checked at the loop's safe point (checkpoint, exit 0)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalFlag:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal (one all-reduce)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if torch.distributed.is_initialized():
            from rlrt_megatron import platform

            flag = flag.to(platform.device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
