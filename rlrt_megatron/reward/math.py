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
import multiprocessing as mp
import os
import re
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

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
def _worker_main(conn: Connection, memory_limit_mb: int) -> None:
    """Worker loop: answer `(task_id, pred, gold)` with `(task_id, status, score)` until None."""
    os.environ["OMP_NUM_THREADS"] = "1"
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
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, pred, gold = msg
        status, score = check_answer(pred, gold)
        conn.send((task_id, status, score))


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0
    started: float = field(default_factory=time.monotonic)


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
        start_method: multiprocessing start method; "spawn" (default) is safe in a process that
            already runs threads (torch, gloo); "forkserver" starts replacements faster.
        startup_timeout_s: how long a new worker may take to import math-verify and warm up.

    Use as a context manager or call `close()`; workers are daemons and die with the trainer.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        *,
        max_answer_chars: int = 1000,
        fallback_last_number: bool = True,
        memory_limit_mb: int = 4096,
        start_method: str = "spawn",
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
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._closed = False
        self.n_restarts = 0  # workers killed and replaced since construction
        for _ in range(self.num_workers):
            self._workers.append(self._start_worker())

    # ------------------------------------------------------------------ workers
    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.memory_limit_mb),
            daemon=True,
            name="rlrt-math-reward",
        )
        proc.start()
        child.close()
        return _Worker(proc=proc, conn=parent)

    def _kill(self, w: _Worker) -> None:
        try:
            w.proc.kill()
            w.proc.join(timeout=5.0)
        except Exception:  # noqa: BLE001 - best effort on an already dead process
            pass
        try:
            w.conn.close()
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

    def _run(self, pending: list[tuple[int, str, str]], result: RewardResult) -> None:
        busy = 0
        while pending or busy:
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.ready and w.task is None and pending:
                    task = pending.pop()
                    try:
                        w.conn.send(task)
                    except (OSError, BrokenPipeError):
                        pending.append(task)
                        self._replace(i)
                        continue
                    w.task, w.deadline = task[0], time.monotonic() + self.timeout_s
                    busy += 1
                elif not w.ready and now - w.started > self.startup_timeout_s:
                    raise RuntimeError(
                        f"MathReward: a worker did not start within {self.startup_timeout_s:.0f} s "
                        "(importing math-verify); check that `math-verify[antlr4_13_2]` is "
                        "installed in this environment, or raise startup_timeout_s"
                    )
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            wait_s = (min(deadlines) - time.monotonic()) if deadlines else 0.5
            conns = {w.conn: i for i, w in enumerate(self._workers)}
            sentinels = {w.proc.sentinel: i for i, w in enumerate(self._workers)}
            ready = wait(list(conns) + list(sentinels), timeout=max(wait_s, 0.0))
            handled: set[int] = set()
            for obj in ready:
                i = conns.get(obj)
                if i is None:
                    continue
                w = self._workers[i]
                try:
                    task_id, status, score = w.conn.recv()
                except (EOFError, OSError):
                    continue  # died: handled through its sentinel below
                handled.add(i)
                if task_id == "ready":
                    w.ready = True
                    continue
                if task_id != w.task:  # pragma: no cover - protocol invariant
                    continue
                w.task = None
                busy -= 1
                result.scores[task_id] = float(score)
                if status == _PARSE_FAIL:
                    result.n_parse_fail += 1
                elif status == _ERROR:
                    result.n_error += 1
            for i, w in enumerate(self._workers):
                if i in handled or w.proc.is_alive():
                    continue
                # Died (out of memory, GMP abort): score 0, count, replace.
                if w.task is not None:
                    result.n_error += 1
                    busy -= 1
                    w.task = None
                logger.warning(
                    "MathReward: worker %s died (exit %s); replacing it",
                    w.proc.pid,
                    w.proc.exitcode,
                )
                self._replace(i)
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.task is not None and now >= w.deadline:
                    logger.warning(
                        "MathReward: sample %d exceeded %.1f s; killing worker %s and replacing it",
                        w.task,
                        self.timeout_s,
                        w.proc.pid,
                    )
                    result.n_timeout += 1
                    busy -= 1
                    w.task = None
                    self._replace(i)

    # ------------------------------------------------------------------ lifecycle
    def health(self) -> bool:
        return not self._closed and all(w.proc.is_alive() for w in self._workers)

    def close(self) -> None:
        """Stop the workers (politely, then SIGKILL after 2 s)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(timeout=2.0)
            if w.proc.is_alive():
                self._kill(w)
            else:
                w.conn.close()
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
