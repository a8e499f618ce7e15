"""What the trainer does when something breaks on purpose or by accident, and its exit codes.

Exit codes of `rlrt train` (every rank):

- 0: done, or preempted (SIGTERM / SIGUSR1: checkpoint written; Slurm requeues);
- 1: an unexpected exception (traceback on stderr);
- 2: bad configuration, or no intact checkpoint to resume (`ckpt_manifest.CheckpointDamaged`);
- 3: a phase did not finish within its timeout (`watchdog.py`: stacks dumped, phase named);
- 4: a checkpoint could not be written (`CheckpointWriteError`: disk full or I/O error; the
  previous checkpoint stays `latest`);
- 5: a NaN / Inf loss or gradient under `train.on_nonfinite=stop` (`NonFiniteError`: step and
  tensor named).

Failure modes handled here:

- a checkpoint write fails (`describe_write_failure`): megatron's writer processes report a full
  disk as e.g. "unexpected pos 704 vs 598", so the error is classified by the errno in the
  exception chain or by the free space left on the checkpoint's file system (less than the
  previous checkpoint's size, or 64 MiB when there is none). The half-written `iter_N.tmp/` is
  removed (freeing the space); `latest` still names the previous complete checkpoint.
- a non-finite loss or gradient: `Policy.train_minibatch` never takes the optimizer step
  (`megatron/train_step.nonfinite_in`); `check_nonfinite` stops the run under `stop`.

Test hooks: `RLRT_FAULT_INJECT` = comma-separated `KIND@STEP` (`injected(kind, step)`), read
by the trainer only where a real fault cannot be produced on purpose in a test:
`nan_loss@K` / `inf_loss@K` (the loss of step K's first mini-batch), `nan_grad@K` (its
gradients, the loss finite), `enospc@K` (`OSError(ENOSPC)` after step K's checkpoint files are
written, for machines where no small tmpfs can be mounted), `kill9_<phase>@K` (`maybe_kill`:
rank `RLRT_FAULT_RANK` dies by SIGKILL as phase `<phase>` of step K starts), `kill9_engine@K`
(`maybe_kill_engine`: the engine's process is SIGKILLed while it generates batch K).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import torch

EXIT_CONFIG = 2
EXIT_CHECKPOINT_WRITE = 4
EXIT_NONFINITE = 5
INJECT_ENV = "RLRT_FAULT_INJECT"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_MIN_FREE = 64 << 20


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; `rlrt train` exits `EXIT_CHECKPOINT_WRITE`."""


class NonFiniteError(RuntimeError):
    """A NaN / Inf loss or gradient under `train.on_nonfinite=stop`; exits `EXIT_NONFINITE`."""


def injected(kind: str, step: int) -> bool:
    """True when `RLRT_FAULT_INJECT` asks for fault `kind` at `step` (test hook)."""
    spec = os.environ.get(INJECT_ENV, "")
    return f"{kind}@{step}" in {s.strip() for s in spec.split(",")}


def maybe_kill(phase: str, step: int, rank: int) -> None:
    """`kill9_<phase>@K` (test hook): rank `RLRT_FAULT_RANK` (default 1) SIGKILLs itself as
    phase `phase` of step K starts, after printing when (`fault injected ... at <unix time>`,
    for the time-to-detect measurement); its peers then wait in the phase's first collective."""
    if injected(f"kill9_{phase}", step) and rank == int(os.environ.get("RLRT_FAULT_RANK", "1")):
        print(f"[rlrt] fault injected: kill -9 of rank {rank} in phase '{phase}' of step {step} "
              f"at {time.time():.3f}", file=sys.stderr, flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_engine(engine: Any, step: int) -> None:
    """`kill9_engine@K` (test hook): SIGKILL the local engine's process (`rollout.local_process`
    or `async_steps=1`) 10 ms after the generation of batch K starts (a tiny model may finish
    a batch in ~50 ms: the death then surfaces at the engine's next call, the weight sync)."""
    proc = getattr(engine, "_proc", None)
    if injected("kill9_engine", step) and proc is not None:
        at = time.time() + 0.01
        print(f"[rlrt] fault injected: kill -9 of the engine process (pid {proc.pid}) while it "
              f"generates batch {step} at {at:.3f}", file=sys.stderr, flush=True)  # fmt: skip
        threading.Timer(0.01, os.kill, (proc.pid, signal.SIGKILL)).start()


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward (the `nan_grad` test hook)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("nan")


def spoil_loss(loss: torch.Tensor, kind: str) -> torch.Tensor:
    """A mini-batch loss spoiled per `kind` (test hook): NaN / Inf value, or a finite value
    whose gradient is NaN."""
    if kind == "nan_grad":
        return _NanGrad.apply(loss)
    return loss * float("nan" if kind == "nan_loss" else "inf")


def _disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def describe_write_failure(
    exc: BaseException, root: str, step: int, previous: str | None
) -> CheckpointWriteError:
    """The error to raise when writing checkpoint `step` under `root` failed with `exc`; removes
    the half-written `iter_N.tmp/` (rank 0)."""
    from rlrt_megatron.trainer.checkpoint import iter_name

    tmp = os.path.join(root, iter_name(step) + ".tmp")
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = -1
    need = _size(previous) if previous else _MIN_FREE
    kept = (
        f"`latest` still names {previous} (intact)"
        if previous
        else "there is no earlier checkpoint"
    )
    if _disk_full(exc) or 0 <= free < need:
        what = (
            f"disk full: {free / 2**20:.1f} MiB free on the file system of {root}, a checkpoint "
            f"takes about {need / 2**20:.1f} MiB"
        )
        fix = "free space there, lower checkpoint.keep_last, or set checkpoint.dir elsewhere"
    else:
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        fix = "check the file system of checkpoint.dir"
    return CheckpointWriteError(
        f"checkpoint of step {step} could not be written to {tmp}: {what}. The partial write was "
        f"removed; {kept}. {fix.capitalize()}, then resume with --resume auto"
    )


def check_nonfinite(what: str | None, step: int, policy: str) -> None:
    """Raise `NonFiniteError` for `what` (from `Policy.last_nonfinite`) under `stop`."""
    if what is not None and policy == "stop":
        raise NonFiniteError(
            f"step {step}: non-finite {what} (NaN or Inf); the optimizer step was not taken and "
            "no checkpoint of this step was written (train.on_nonfinite=stop). Resume from the "
            "last checkpoint with a lower optimizer.lr, or set train.on_nonfinite=skip"
        )
