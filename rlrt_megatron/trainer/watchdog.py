"""No silent hangs: every trainer phase runs under a timeout.

`Watchdog.phase("update")` arms a per-rank timer thread. If the phase has not finished when its
timeout expires, the thread writes, to stderr and to `<run_dir>/logs/watchdog_rank<R>.log`:

    [watchdog] rank 1: phase 'update' did not finish within 30s (timeouts.update); stacks follow
    Thread 0x... (most recent call first):
      File ".../train.py", line 123 in update
      ...

and exits the process with `EXIT_CODE` (`os._exit`: a rank blocked in a collective cannot be
unwound). Every rank runs its own watchdog with the same phase timeouts, so when one rank stalls,
the others (waiting for it inside a collective of the same phase) time out too and dump their
stacks: the log holds all ranks' stacks and the launcher sees a non-zero exit naming the phase.

A phase that raises instead (a collective failing because a peer rank died: gloo notices the
closed connection) is named the same way, with the stacks, before the exception unwinds
(`rlrt train` then exits 1).

`faulthandler` also dumps the stacks on SIGUSR2 (`kill -USR2 <pid>`) for a live look at a run.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rlrt_megatron.config import ConfigError
from rlrt_megatron.trainer.faults import CheckpointWriteError, NonFiniteError

EXIT_CODE = 3  # distinct from Python's 1 (exception) and from signals (128 + n)
# errors whose message says all (a bad config, a damaged checkpoint, a full disk, a NaN): no
# stack dump when a phase raises one
_SELF_EXPLAINED = (ConfigError, CheckpointWriteError, NonFiniteError)


class Watchdog:
    """Phase timeouts for one rank.

    Args:
        timeouts: phase name -> seconds (e.g. `dataclasses.asdict(cfg.timeouts)`); a phase not in
            the mapping uses `default_timeout`.
        rank: this process's global rank (in messages and the log file name).
        log_dir: directory for `watchdog_rank<R>.log` (None: stderr only).
        exit_code: process exit status on expiry.
    """

    def __init__(
        self,
        timeouts: dict[str, float] | Any,
        rank: int = 0,
        log_dir: str | None = None,
        default_timeout: float = 3600.0,
        exit_code: int = EXIT_CODE,
    ) -> None:
        if not isinstance(timeouts, dict):
            import dataclasses

            timeouts = dataclasses.asdict(timeouts)
        self.timeouts = {k: float(v) for k, v in timeouts.items()}
        self.rank = rank
        self.default_timeout = default_timeout
        self.exit_code = exit_code
        self.log_path = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.log_path = os.path.join(log_dir, f"watchdog_rank{rank}.log")
        self._cond = threading.Condition()
        self._stack: list[tuple[str, float, float]] = []  # (phase, deadline, timeout)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rlrt-watchdog", daemon=True)
        self._thread.start()
        try:  # live stack dumps on demand; not available on every platform / thread
            faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
        except (AttributeError, ValueError, RuntimeError):
            pass

    def timeout_for(self, name: str) -> float:
        return self.timeouts.get(name, self.default_timeout)

    @contextmanager
    def phase(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Run the body under `timeout` seconds (default: the phase's configured timeout)."""
        t = self.timeout_for(name) if timeout is None else float(timeout)
        with self._cond:
            self._stack.append((name, time.monotonic() + t, t))
            self._cond.notify()
        t0 = time.monotonic()
        try:
            yield
        except Exception as e:
            if not isinstance(e, _SELF_EXPLAINED):
                self._report_failure(name, time.monotonic() - t0, e)
            raise
        finally:
            with self._cond:
                self._stack.pop()
                self._cond.notify()

    @property
    def current_phase(self) -> str | None:
        with self._cond:
            return self._stack[-1][0] if self._stack else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    # -- the timer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._stack:
                    self._cond.wait()
                    continue
                # The innermost phase with the earliest deadline decides.
                name, deadline, timeout = min(self._stack, key=lambda s: s[1])
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(timeout=left)
                    continue
                self._expire(name, timeout)

    def _report_failure(self, name: str, seconds: float, exc: BaseException) -> None:
        """A phase raised (e.g. a collective failed because a peer rank died): name the phase on
        stderr and in the rank's log, with every thread's stack, before the exception unwinds."""
        msg = (
            f"[watchdog] rank {self.rank}: phase '{name}' failed after {seconds:.1f}s: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; Python "
            "stacks of all threads of this rank follow\n"
        )
        streams: list[TextIO] = [sys.stderr]
        log = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115
        if log is not None:
            streams.append(log)
        for s in streams:
            try:
                s.write(msg)
                faulthandler.dump_traceback(file=s, all_threads=True)
                s.flush()
            except (OSError, ValueError):
                pass
        if log is not None:
            log.close()

    def _expire(self, name: str, timeout: float) -> None:
        msg = (
            f"[watchdog] rank {self.rank}: phase '{name}' did not finish within {timeout:g}s "
            f"(timeouts.{name}); Python stacks of all threads of this rank follow, then exit "
            f"{self.exit_code}\n"
        )
        streams: list[TextIO] = [sys.stderr]
        log = None
        if self.log_path:
            log = open(self.log_path, "a")  # noqa: SIM115 - kept open until os._exit
            streams.append(log)
        for s in streams:
            try:
                s.write(msg)
                s.flush()
                faulthandler.dump_traceback(file=s, all_threads=True)
                s.write(f"[watchdog] rank {self.rank}: exiting: phase '{name}' timed out\n")
                s.flush()
            except (OSError, ValueError):
                pass
        if log is not None:
            os.fsync(log.fileno())
        os._exit(self.exit_code)


class NullWatchdog(Watchdog):
    """A watchdog that never fires (tests of the loop body, tools)."""

    def __init__(self) -> None:  # noqa: D107 - no thread
        self.timeouts = {}
        self.rank = 0

    @contextmanager
    def phase(self, name: str, timeout: float | None = None) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass
