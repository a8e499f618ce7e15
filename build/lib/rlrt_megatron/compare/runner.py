"""Run every (algorithm, seed) pair of a comparison as its own `rlrt train` process, resumably.

Layout of `run_dir`:
    model/                      the SFT-warmed tiny model (tiny recipes), built once, shared
    <algorithm>/seed<s>/        one `rlrt train` run: metrics.jsonl, checkpoints/, train.log,
                                compare_pair.json (what was launched), compare_done.json (finished)

Seeds: seed s runs with `train.seed = base + s` and `rollout.seed = base + s` (the bases are the
recipe's values, after the user's overrides): the prompt order, the training problems and every
sampled token change with s; the warmed start model does not (it is the same for every pair).

Failure modes and what the caller sees:
- a pair that exits non-zero or stops early: reported with its log's tail, the other pairs go
  on, `run()` returns it in `failed`; the next `rlrt compare` retries it;
- Ctrl-C / SIGTERM / SIGHUP to `rlrt compare`: no new pairs start, the running ones get SIGTERM
  (the trainer checkpoints at its next safe point and exits), a second signal kills them at once;
  the next `rlrt compare` resumes them from that checkpoint (`checkpoint.resume=auto`);
- `rlrt compare` itself killed (-9, OOM): each trainer was started with a parent-death signal
  (SIGTERM, Linux), so it checkpoints and exits as above rather than running on unsupervised.
  A pair's `.lock` is held by its trainer: a rerun waits for such a leftover trainer to exit;
- a pair whose resolved config (logging aside) differs from the requested one (other steps,
  overrides): its directory is deleted and it is run from scratch (printed).
Two `rlrt compare` in the same `run_dir` at once: the second stops with a message (`.compare.lock`).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PAIR_FILE = "compare_pair.json"
DONE_FILE = "compare_done.json"
LOG_FILE = "train.log"
# Variables that would make a trainer join someone else's process group (torchrun, Slurm).
DIST_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NPROCS",
)  # fmt: skip
# Overrides `rlrt compare` owns (one directory and one seed per pair).
RESERVED = ("logging.run_dir", "checkpoint.dir", "checkpoint.resume")


@dataclass
class Pair:
    algorithm: str
    seed: int
    recipe: str
    run_dir: str
    overrides: list[str]  # everything after `--recipe NAME`
    steps: int
    config: dict  # the resolved config, `logging.*` aside: what makes two runs the same run

    @property
    def name(self) -> str:
        return f"{self.algorithm} seed {self.seed}"

    def spec(self) -> dict[str, Any]:
        # as it reads back from json (tuples -> lists), so a stored spec compares equal
        return json.loads(json.dumps({"recipe": self.recipe, "config": self.config}))

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "rlrt_megatron.cli", "train", "--recipe", self.recipe,
                *self.overrides]  # fmt: skip

    def done(self) -> bool:
        """Finished with exactly these settings (and its metrics reach the last step)."""
        try:
            with open(os.path.join(self.run_dir, DONE_FILE)) as f:
                return json.load(f).get("spec") == self.spec()
        except (OSError, json.JSONDecodeError):
            return False

    def last_step(self) -> int:
        from rlrt_megatron.compare.report import read_metrics

        path = os.path.join(self.run_dir, "metrics.jsonl")
        rows = read_metrics(path) if os.path.isfile(path) else []
        return int(rows[-1]["step"]) if rows else 0


@dataclass
class Outcome:
    done: list[Pair] = field(default_factory=list)  # finished now or before
    kept: list[Pair] = field(default_factory=list)  # of those, finished before this call
    failed: list[Pair] = field(default_factory=list)
    interrupted: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # pair name -> its run time


def seed_overrides(base_train_seed: int, base_rollout_seed: int, seed: int) -> list[str]:
    return [f"train.seed={base_train_seed + seed}", f"rollout.seed={base_rollout_seed + seed}"]


def child_env(gpu: str | None, cpu: bool, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["MASTER_PORT"] = str(port)  # a single-process trainer binds it for its gloo/nccl group
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cpu:
        env["OMP_NUM_THREADS"] = "1"  # one core per pair: --parallel N uses N cores
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM this trainer when `rlrt compare` dies (it then checkpoints and exits)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Lock:
    """An exclusive `flock` on `path` (released when every holder's descriptor is closed)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Running:
    pair: Pair
    proc: subprocess.Popen
    lock: _Lock
    log: Any
    start: float
    gpu: str | None


def gpu_slots() -> list[str]:
    """The GPU ids pairs are spread over (round robin), [] on CPU."""
    from rlrt_megatron import platform

    if platform.is_cpu_mode():
        return []
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def auto_parallel(n_pairs: int, gpus: list[str]) -> int:
    """GPU: 4 pairs per GPU (the tiny model leaves a GPU mostly idle); CPU: one pair per 2
    cores, at most one per 3 GiB of available memory."""
    if gpus:
        return max(1, min(n_pairs, 4 * len(gpus)))
    cores = max(1, (os.cpu_count() or 1) // 2)
    mem = cores
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: ln.split()[1] for ln in f}
        mem = max(1, int(info["MemAvailable"]) // (3 * 1024 * 1024))
    except (OSError, KeyError, ValueError):
        pass
    return max(1, min(n_pairs, cores, mem))


class Runner:
    """Runs `pairs` with at most `parallel` trainers at once; `log` prints progress."""

    def __init__(
        self,
        run_dir: str,
        pairs: list[Pair],
        parallel: int,
        *,
        gpus: list[str],
        log: Callable[[str], None] = print,
        poll_s: float = 0.5,
        term_grace_s: float = 600.0,
    ) -> None:
        self.run_dir, self.pairs, self.parallel = run_dir, pairs, max(1, parallel)
        self.gpus, self.log, self.poll_s, self.term_grace_s = gpus, log, poll_s, term_grace_s
        self._signals = 0
        self._ports: set[int] = set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self.log(f"{name}: no new pairs; running pairs checkpoint and stop (again = kill)")
        else:
            self.log(f"{name} again: killing the running pairs")

    def run(self) -> Outcome:
        lock = _Lock(os.path.join(self.run_dir, ".compare.lock"))
        if not lock.try_acquire():
            lock.close()
            raise RuntimeError(
                f"another `rlrt compare` is running in {self.run_dir} (.compare.lock is held): "
                "wait for it or use another --run-dir"
            )
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        try:
            return self._run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            lock.close()

    def _run(self) -> Outcome:
        out = Outcome()
        pending = []
        for p in self.pairs:
            if p.done():
                out.done.append(p)
                out.kept.append(p)
                continue
            pending.append(p)
        if out.kept:
            self.log(f"{len(out.kept)} pair(s) already finished, kept: "
                     + ", ".join(p.name for p in out.kept))  # fmt: skip
        running: list[_Running] = []
        finished_times: list[float] = []
        total = len(self.pairs)
        term_sent = kill_sent = 0.0
        while pending or running:
            if not self._signals:
                while pending and len(running) < self.parallel:
                    running.append(self._start(pending.pop(0), running))
            elif not term_sent:
                term_sent = time.monotonic()
                for r in running:
                    r.proc.send_signal(signal.SIGTERM)
            if (
                running
                and not kill_sent
                and (
                    self._signals > 1
                    or (term_sent and time.monotonic() - term_sent > self.term_grace_s)
                )
            ):
                kill_sent = time.monotonic()
                for r in running:
                    r.proc.kill()
            time.sleep(self.poll_s)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                ok = self._finish(r, out)
                if ok:
                    finished_times.append(out.seconds[r.pair.name])
                    left = len(pending) + len(running)
                    eta = ""
                    if left and finished_times:
                        per = sum(finished_times) / len(finished_times)
                        eta = f", about {_minutes(per * left / self.parallel)} left"
                    self.log(f"[{len(out.done)}/{total} done{eta}]")
            if self._signals and pending:
                pending.clear()
                out.interrupted = True
        out.interrupted = out.interrupted or bool(self._signals)
        return out

    def _start(self, pair: Pair, running: list[_Running]) -> _Running:
        os.makedirs(pair.run_dir, exist_ok=True)
        lock = _Lock(os.path.join(pair.run_dir, ".lock"))
        if not lock.try_acquire():
            self.log(f"{pair.name}: a trainer left by an earlier `rlrt compare` still holds "
                     f"{pair.run_dir}/.lock; waiting for it to exit")  # fmt: skip
            lock.acquire()
        state_path = os.path.join(pair.run_dir, PAIR_FILE)
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError):
            state = {}
        earlier = float(state.get("seconds", 0.0))
        if state and state.get("spec") != pair.spec():
            earlier = 0.0
            self.log(f"{pair.name}: its config changed since its last run: starting over")
            for name in os.listdir(pair.run_dir):
                if name != ".lock":
                    path = os.path.join(pair.run_dir, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
        resumed = pair.last_step()
        slot_gpu = None
        if self.gpus:  # the GPU with the fewest running pairs
            busy = [r.gpu for r in running]
            slot_gpu = min(self.gpus, key=busy.count)
        env = child_env(slot_gpu, cpu=not self.gpus, port=_free_port(self._ports))
        log = open(os.path.join(pair.run_dir, LOG_FILE), "a")  # noqa: SIM115 - closed in _finish
        log.write(f"\n$ {' '.join(pair.argv())}\n")
        log.flush()
        proc = subprocess.Popen(
            pair.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            pass_fds=(lock.fd,),  # the trainer holds the pair's lock as long as it lives
            start_new_session=True,  # a terminal's Ctrl-C reaches `rlrt compare` only
            preexec_fn=_parent_death_signal,  # noqa: PLW1509 - no threads started here
        )
        _write_json(state_path, {"spec": pair.spec(), "pid": proc.pid, "seconds": earlier})
        where = f"GPU {slot_gpu}" if slot_gpu is not None else "CPU"
        again = f", continuing after step {resumed}" if resumed else ""
        self.log(f"{pair.name}: started ({where}, pid {proc.pid}{again}); log {log.name}")
        return _Running(pair, proc, lock, log, time.monotonic() - earlier, slot_gpu)

    def _finish(self, r: _Running, out: Outcome) -> bool:
        rc = r.proc.returncode
        r.log.close()
        r.lock.close()
        secs = time.monotonic() - r.start  # this pair's run time, earlier segments included
        out.seconds[r.pair.name] = secs
        last = r.pair.last_step()
        state = {"spec": r.pair.spec(), "pid": r.proc.pid, "seconds": secs}
        _write_json(os.path.join(r.pair.run_dir, PAIR_FILE), state)
        if rc == 0 and last >= r.pair.steps:
            _write_json(os.path.join(r.pair.run_dir, DONE_FILE), {**state, "finished": time.time()})
            out.done.append(r.pair)
            self.log(f"{r.pair.name}: finished {last} steps in {secs:.0f} s")
            return True
        if rc == 0 or self._signals:  # stopped on our signal (checkpointed when rc == 0)
            self.log(f"{r.pair.name}: stopped after step {last} (exit {rc}); rerun to continue")
            out.interrupted = True
            return False
        out.failed.append(r.pair)
        tail = _tail(os.path.join(r.pair.run_dir, LOG_FILE))
        self.log(f"{r.pair.name}: FAILED (exit {rc}) after step {last}; last lines of "
                 f"{r.pair.run_dir}/{LOG_FILE}:\n{tail}")  # fmt: skip
        return False


def _write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return "(no log)"
