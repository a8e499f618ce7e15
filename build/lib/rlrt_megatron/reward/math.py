"""Math reward: math-verify on the final answer, in worker processes with a wall-clock limit.

`MathReward.score(completions, references)` returns one 0/1 score per completion. The final answer
is extracted in the trainer's process with linear-time scans (the last `\\boxed{...}`, else the last
`Answer: X` line, else the last number), then `math_verify.parse` + `verify(gold, pred)` run in a
worker process. math-verify's own timeouts use SIGALRM, which only works in a main thread and
cannot interrupt C code (sympy evaluating `9^{9^{9^{9^9}}}` spends minutes inside GMP), so they are
off and every sample gets our own wall-clock deadline instead: a worker that misses it is killed
(SIGKILL) and replaced, and the sample scores 0 and is counted as a timeout. Workers also run under
an address-space limit so one pathological sample cannot take the machine's memory. A parse failure
(no answer found, answer too long, math-verify parses nothing) scores 0 and is counted too; the
step never crashes because of a completion's content.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

logger = logging.getLogger(__name__)

# Status codes a worker answers with.
_OK, _PARSE_FAIL, _ERROR = "ok", "parse_fail", "error"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_RE = re.compile(r"(?i)\banswer\s*[:：]")
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


# --------------------------------------------------------------------------- answer extraction
def _boxed_content(text: str, start: int) -> str | None:
    """Content of the `\\boxed` macro whose name ends at `start`, or None if unbalanced."""
    i = start
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        # `\boxed 5` form: the next run of non-space characters (stop at `$`).
        j = i
        while j < n and not text[j].isspace() and text[j] != "$":
            j += 1
        return text[i:j] if j > i and start != i else None
    depth = 0
    for j in range(i, n):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _strip_answer(ans: str) -> str:
    ans = ans.strip()
    # `$...$`, `\(...\)`, trailing full stop: math-verify gets the bare expression.
    if len(ans) >= 2 and ans.startswith("$") and ans.endswith("$"):
        ans = ans.strip("$").strip()
    if ans.startswith("\\(") and ans.endswith("\\)"):
        ans = ans[2:-2].strip()
    if ans.endswith(".") and not ans[:-1].rstrip().endswith("."):
        ans = ans[:-1].rstrip()
    return ans


def extract_final_answer(
    text: str, *, fallback_last_number: bool = True, max_scan_chars: int = 100_000
) -> str | None:
    """The final answer in `text`: the last `\\boxed{}` (or `\\fbox{}`), else the last `Answer: X`
    line, else (when `fallback_last_number`) the last number. None when there is none.

    Linear time in `len(text)`; only the last `max_scan_chars` characters are scanned (answers come
    at the end of a response).
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[-max_scan_chars:]
    # Last boxed with a balanced argument; an unbalanced last one falls back to the one before.
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches[-8:]):
        content = _boxed_content(text, m.end())
        if content is not None and content.strip():
            return content.strip()
    last = None
    for last in _ANSWER_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is not None:
        end = text.find("\n", last.end())
        ans = _strip_answer(text[last.end() : end if end >= 0 else len(text)])
        if ans:
            return ans
    if fallback_last_number:
        num = None
        for num in _NUMBER_RE.finditer(text):  # noqa: B007
            pass
        if num is not None:
            return num.group(0).replace(",", "")
    return None


def _wrap(latex: str) -> str:
    """math-verify's extraction finds `\\boxed{}` first; wrap the bare expression in one."""
    return latex if "\\boxed" in latex else f"\\boxed{{{latex}}}"


def check_answer(pred_answer: str, reference: str) -> tuple[str, float]:
    """math-verify `verify(gold, pred)` (gold first), in THIS process, without any timeout.

    Returns `(status, score)` with status "ok" | "parse_fail" | "error". Use it only where the
    inputs are trusted (tests); `MathReward` runs it in killable workers.
    """
    from math_verify import parse, verify

    try:
        gold = parse(_wrap(_strip_answer(reference)), parsing_timeout=None)
        if not gold:
            return _PARSE_FAIL, 0.0
        pred = parse(_wrap(pred_answer), parsing_timeout=None)
        if not pred:
            return _PARSE_FAIL, 0.0
        return _OK, float(bool(verify(gold, pred, timeout_seconds=None)))
    except MemoryError:
        return _ERROR, 0.0
    except Exception:  # noqa: BLE001 - math-verify/sympy raise anything on odd input
        return _ERROR, 0.0


# --------------------------------------------------------------------------- worker process
# Workers are fresh interpreters (`python -m rlrt_megatron.reward._worker`), not multiprocessing
# children: spawn/forkserver re-import the caller's __main__ (re-running an unguarded script), fork
# copies a process that runs torch/gloo threads. Messages are length-prefixed pickles on
# stdin/stdout; the worker moves library prints off its protocol stream.
_HEADER = struct.Struct("<I")


def _send_msg(fd: int, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv_msg(fd: int) -> tuple[bool, object]:
    """(True, message) or (False, None) at end of stream (the other side died or closed)."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return False, None
    body = _read_exact(fd, _HEADER.unpack(head)[0])
    if body is None:
        return False, None
    return True, pickle.loads(body)


def worker_loop(memory_limit_mb: int) -> None:
    """Worker main loop: answer `(task_id, pred, gold)` with `(task_id, status, score)`."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol stream
    if memory_limit_mb > 0:
        try:
            import resource

            lim = memory_limit_mb * (1 << 20)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        except (ImportError, ValueError, OSError):  # pragma: no cover - non-Linux
            pass
    # math-verify warns once per process that its own timeouts are off: they are, on purpose.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    check_answer("1", "1")  # warm up the LaTeX parser before declaring readiness
    _send_msg(out_fd, ("ready", None, None))
    while True:
        ok, msg = _recv_msg(0)
        if not ok or msg is None:
            return
        task_id, pred, gold = msg  # type: ignore[misc]
        status, score = check_answer(pred, gold)
        _send_msg(out_fd, (task_id, status, score))


@dataclass
class _Worker:
    proc: subprocess.Popen
    ready: bool = False
    task: tuple[int, str, str] | None = None
    deadline: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def out_fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    @property
    def in_fd(self) -> int:
        assert self.proc.stdin is not None
        return self.proc.stdin.fileno()


@dataclass
class RewardResult:
    """Scores of one batch and what went wrong (each such sample scored 0).

    `n_timeout`: samples whose worker missed the per-sample deadline (worker killed and replaced);
    `n_parse_fail`: no final answer found, answer longer than `max_answer_chars`, or math-verify
    parsed nothing; `n_error`: math-verify raised, or the worker died (e.g. out of memory).
    """

    scores: list[float]
    n_timeout: int = 0
    n_parse_fail: int = 0
    n_error: int = 0
    answers: list[str | None] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return self.n_timeout + self.n_parse_fail + self.n_error

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        n = max(len(self.scores), 1)
        return {
            f"{prefix}mean": sum(self.scores) / n,
            f"{prefix}n_timeout": float(self.n_timeout),
            f"{prefix}n_parse_fail": float(self.n_parse_fail),
            f"{prefix}n_error": float(self.n_error),
        }


class MathReward:
    """Batch math-verify scorer with worker processes and a per-sample wall-clock timeout.

    Args:
        timeout_s: the longest one sample may take in a worker; then the worker is killed and
            replaced and the sample scores 0 (counted in `RewardResult.n_timeout`).
        num_workers: worker processes (each scores one sample at a time).
        max_answer_chars: an extracted answer longer than this is a parse failure (never sent).
        fallback_last_number: use the last number of the response when it has no `\\boxed{}` and
            no `Answer:` line.
        memory_limit_mb: address-space limit of each worker (0: none).
        startup_timeout_s: how long a new worker may take to import math-verify and warm up.

    Use as a context manager or call `close()`; workers exit when their stdin closes
    (the trainer exiting).
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        *,
        max_answer_chars: int = 1000,
        fallback_last_number: bool = True,
        memory_limit_mb: int = 4096,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"MathReward: timeout_s={timeout_s} must be > 0 (seconds per sample)")
        if num_workers < 1:
            raise ValueError(f"MathReward: num_workers={num_workers} must be >= 1")
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers)
        self.max_answer_chars = int(max_answer_chars)
        self.fallback_last_number = fallback_last_number
        self.memory_limit_mb = int(memory_limit_mb)
        self.startup_timeout_s = float(startup_timeout_s)
        self._workers: list[_Worker] = []
        self._closed = False
        self.n_restarts = 0  # workers killed and replaced since construction
        for _ in range(self.num_workers):
            self._workers.append(self._start_worker())

    # ------------------------------------------------------------------ workers
    def _start_worker(self) -> _Worker:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        root = str(Path(__file__).resolve().parents[2])  # the directory holding rlrt_megatron/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlrt_megatron.reward._worker", str(self.memory_limit_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
            close_fds=True,
        )
        return _Worker(proc=proc)

    def _kill(self, w: _Worker) -> None:
        try:
            w.proc.kill()
            w.proc.wait(timeout=5.0)
        except Exception:  # noqa: BLE001 - best effort on an already dead process
            pass
        for f in (w.proc.stdin, w.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass

    def _replace(self, i: int) -> None:
        self._kill(self._workers[i])
        self._workers[i] = self._start_worker()
        self.n_restarts += 1

    # ------------------------------------------------------------------ scoring
    def __call__(self, completions: list[str], references: list[str]) -> RewardResult:
        return self.score(completions, references)

    def score(self, completions: list[str], references: list[str]) -> RewardResult:
        """Score `completions[i]` against `references[i]` (the reference answer string): 1.0 if
        math-verify says the final answer equals the reference, else 0.0."""
        if self._closed:
            raise RuntimeError("MathReward.score called after close(); create a new MathReward")
        if len(completions) != len(references):
            raise ValueError(
                f"MathReward.score: {len(completions)} completions but {len(references)} "
                "references; pass one reference answer per completion"
            )
        n = len(completions)
        result = RewardResult(scores=[0.0] * n, answers=[None] * n)
        pending: list[tuple[int, str, str]] = []
        for i, (text, ref) in enumerate(zip(completions, references, strict=True)):
            ans = extract_final_answer(text, fallback_last_number=self.fallback_last_number)
            result.answers[i] = ans
            if ans is None or len(ans) > self.max_answer_chars or not str(ref).strip():
                result.n_parse_fail += 1
                continue
            pending.append((i, ans, str(ref)))
        pending.reverse()  # pop() from the end keeps the original order
        self._run(pending, result)
        return result

    def _run(
        self, pending: list[tuple[int, str, str]], result: RewardResult, until_ready: bool = False
    ) -> None:
        crashed: set[int] = set()
        while (
            pending
            or any(w.task is not None for w in self._workers)
            or (until_ready and not all(w.ready for w in self._workers))
        ):
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.ready and w.task is None and pending:
                    if w.proc.poll() is not None:  # died while idle
                        self._replace(i)
                        continue
                    task = pending.pop()
                    try:
                        _send_msg(w.in_fd, task)
                    except OSError:
                        pending.append(task)
                        self._replace(i)
                        continue
                    w.task, w.deadline = task, time.monotonic() + self.timeout_s
                elif w.task is None and w.proc.poll() is not None:  # died while starting
                    self._replace(i)
                elif not w.ready and now - w.started > self.startup_timeout_s:
                    raise RuntimeError(
                        f"MathReward: a worker did not start within {self.startup_timeout_s:.0f} s "
                        "(importing math-verify); check that `math-verify[antlr4_13_2]` is "
                        "installed in this environment, or raise startup_timeout_s"
                    )
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            wait_s = (min(deadlines) - time.monotonic()) if deadlines else 0.5
            by_file = {w.proc.stdout: i for i, w in enumerate(self._workers)}
            for f in wait(list(by_file), timeout=max(wait_s, 0.0)):
                i = by_file[f]
                w = self._workers[i]
                ok, msg = _recv_msg(w.out_fd)
                if not ok:  # died (out of memory, GMP abort, killed): score 0, count, replace
                    logger.warning(
                        "MathReward: worker %s died (exit %s); replacing it",
                        w.proc.pid,
                        w.proc.poll(),
                    )
                    if w.task is not None:
                        # Retry once: the worker may have died of something else (killed from
                        # outside); a sample that kills two workers scores 0.
                        if w.task[0] in crashed:
                            result.n_error += 1
                        else:
                            crashed.add(w.task[0])
                            pending.append(w.task)
                    self._replace(i)
                    continue
                task_id, status, score = msg  # type: ignore[misc]
                if task_id == "ready":
                    w.ready = True
                    continue
                if w.task is None or task_id != w.task[0]:  # pragma: no cover - invariant
                    continue
                w.task = None
                result.scores[task_id] = float(score)
                if status == _PARSE_FAIL:
                    result.n_parse_fail += 1
                elif status == _ERROR:
                    result.n_error += 1
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.task is not None and now >= w.deadline:
                    logger.warning(
                        "MathReward: sample %d exceeded %.1f s; killing worker %s and replacing it",
                        w.task[0],
                        self.timeout_s,
                        w.proc.pid,
                    )
                    result.n_timeout += 1
                    self._replace(i)

    # ------------------------------------------------------------------ lifecycle
    def wait_ready(self) -> None:
        """Block until every worker has imported math-verify (call early to hide start-up)."""
        while not self._closed and not all(w.ready for w in self._workers):
            self._run([], RewardResult(scores=[]), until_ready=True)

    def health(self) -> bool:
        return not self._closed and all(w.proc.poll() is None for w in self._workers)

    def close(self) -> None:
        """Stop the workers (politely, then SIGKILL after 2 s)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                _send_msg(w.in_fd, None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            if w.ready:  # a starting worker reads no stdin until it is up: just kill it
                try:
                    w.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    pass
            self._kill(w)
        self._workers = []

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
