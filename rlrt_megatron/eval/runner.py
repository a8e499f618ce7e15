"""Sample k answers per problem through a rollout engine, score them, aggregate avg@k / pass@k.

One `engine.generate` call per problem (its k samples), seeded by
``seed_p = H(seed, benchmark, problem uid)``: a problem's samples do not depend on which other
problems are evaluated, in which order, or whether the run was interrupted, so a resumed run
reproduces the uninterrupted one exactly. Several problems can be in flight at once
(`concurrency`, threads; SGLang batches them server-side); scoring runs in the caller's thread.

Resume file (`results_path`, jsonl): line 1 is ``{"_meta": settings}``; then one line per finished
problem, appended (and flushed) as soon as it is scored::

    {"benchmark": "aime24", "uid": "3:1f0c...", "index": 3, "n": 16, "correct": 5,
     "scores": [0, 1, ...], "answers": ["204", null, ...], "response_tokens": [812, ...],
     "finish_reasons": ["stop", ...], "reward_failures": 0, "responses": [...]  (optional)}

A rerun with the same file skips every problem that has a line (only a torn last line, from a
kill during the write, is dropped and redone). Settings that change the samples (k, sampling,
seed, prompt template, model) must match the `_meta` line, else `ResumeError` says which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlrt_megatron.data.templates import PromptTemplate, render_prompt
from rlrt_megatron.eval.benchmarks import Benchmark, BenchProblem
from rlrt_megatron.eval.metrics import mean_over, summarize_problems
from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

AVERAGE = "average"


class ResumeError(ValueError):
    """The results file cannot be resumed (other settings, other problems, corrupt line)."""


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides the samples (stored in the resume file's `_meta` line).

    `model` identifies the weights (a path or a trainer's `step=N`); `instruction`,
    `system_prompt`, `use_chat_template`, `chat_template_kwargs` are the prompt template.
    """

    k: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_new_tokens: int = 4096
    seed: int = 0
    model: str = ""
    instruction: str = PromptTemplate().instruction
    system_prompt: str | None = None
    use_chat_template: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def template(self) -> PromptTemplate:
        return PromptTemplate(
            instruction=self.instruction,
            system_prompt=self.system_prompt,
            use_chat_template=self.use_chat_template,
            chat_template_kwargs=dict(self.chat_template_kwargs),
        )

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(
            n=self.k,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )

    def validate(self) -> None:
        problems = []
        if self.k < 1:
            problems.append(f"k={self.k} must be >= 1 (samples per problem)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if problems:
            raise ValueError("eval settings: " + "; ".join(problems))


def problem_seed(seed: int, benchmark: str, uid: str) -> int:
    """``H(seed, benchmark, uid)``: a 31-bit call seed (fits every engine's seed field)."""
    h = hashlib.sha256(f"{seed}:{benchmark}:{uid}".encode()).hexdigest()
    return int(h[:8], 16) & 0x7FFFFFFF


@dataclass
class EvalReport:
    """Per-problem records (by benchmark, in problem order) and the aggregated summary."""

    settings: EvalSettings
    records: dict[str, list[dict]]
    summary: dict[str, dict[str, float]]
    n_sampled: int = 0  # problems sampled by this call (the rest came from the resume file)
    n_resumed: int = 0

    def to_json(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "benchmarks": {b: v for b, v in self.summary.items() if b != AVERAGE},
            "average": self.summary.get(AVERAGE, {}),
        }


# --------------------------------------------------------------------------- resume file
def _meta_view(settings: EvalSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))  # tuples -> lists, as read back


def read_results(
    path: Path, settings: EvalSettings | None = None
) -> tuple[dict | None, dict[tuple[str, str], dict]]:
    """Read a resume file -> (meta, {(benchmark, uid): record}).

    A torn last line (kill during the write) is dropped and the file truncated to the last whole
    line; a bad line elsewhere raises `ResumeError` with the file and line number.
    """
    if not path.exists():
        return None, {}
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1  # bytes after the last newline: a torn, unterminated line
    if raw[end:].strip():
        logger.warning("%s: dropping a torn last line (killed while writing); redoing it", path)
    meta, records = None, {}
    for lineno, line in enumerate(raw[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        except ValueError as e:
            raise ResumeError(
                f"{path}: line {lineno} is not a JSON object ({e}); the results file is "
                "corrupt: delete that line (the problem is redone) or use a new --out"
            ) from e
        if "_meta" in obj:
            meta = obj["_meta"]
            continue
        for key in ("benchmark", "uid", "n", "correct", "scores"):
            if key not in obj:
                raise ResumeError(
                    f"{path}: line {lineno} has no {key!r}; the results file was not written "
                    "by `rlrt eval` (or is corrupt): use a new --out"
                )
        records.setdefault((obj["benchmark"], obj["uid"]), obj)
    if end < len(raw):  # cut the torn tail so appends start on a fresh line
        with path.open("r+b") as f:
            f.truncate(end)
    if settings is not None and meta is not None:
        want = _meta_view(settings)
        diff = [k for k in sorted(set(want) | set(meta)) if want.get(k) != meta.get(k)]
        if diff:
            details = "; ".join(f"{k}: file {meta.get(k)!r}, now {want.get(k)!r}" for k in diff)
            raise ResumeError(
                f"{path}: written with other settings ({details}); rerun with the same "
                "settings to resume, or use a new --out (or --overwrite) for a fresh evaluation"
            )
    return meta, records


class _ResultsWriter:
    def __init__(self, path: Path, settings: EvalSettings, has_meta: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", encoding="utf-8")
        if not has_meta:
            self.write({"_meta": _meta_view(settings)})

    def write(self, obj: dict) -> None:
        # one write() of a whole line: a kill leaves whole lines or one torn last line
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------- evaluation
def _check_records(bench: Benchmark, done: dict[tuple[str, str], dict], path: Path | None) -> None:
    uids = {p.uid for p in bench.problems}
    for (b, uid), rec in done.items():
        if b == bench.name and uid not in uids and int(rec.get("index", -1)) < len(bench):
            raise ResumeError(
                f"{path}: has a result for {b} problem {uid} that is not in {bench.path} "
                "(the benchmark file changed since); use a new --out for a fresh evaluation"
            )


def _score_problem(
    bench: Benchmark,
    prob: BenchProblem,
    completions: Sequence[Any],
    reward: Callable[[list[str], list[str]], Any],
    save_responses: bool,
) -> dict:
    texts = [c.text for c in completions]
    res = reward(texts, [prob.answer] * len(texts))
    scores = [float(s) for s in res.scores]
    rec = {
        "benchmark": bench.name,
        "uid": prob.uid,
        "index": prob.index,
        "n": len(scores),
        "correct": int(sum(1 for s in scores if s >= 0.5)),
        "scores": scores,
        "answers": list(getattr(res, "answers", []) or [None] * len(scores)),
        "response_tokens": [len(c.token_ids) for c in completions],
        "finish_reasons": [c.finish_reason for c in completions],
        "reward_failures": int(getattr(res, "n_failed", 0)),
    }
    if save_responses:
        rec["responses"] = texts
    return rec


def summarize(records: dict[str, list[dict]], k: int) -> dict[str, dict[str, float]]:
    """Per-benchmark metrics (`metrics.summarize_problems` + mean response length, fraction
    truncated at `max_new_tokens`, reward failures) and their unweighted mean ("average")."""
    summary: dict[str, dict[str, float]] = {}
    for name, recs in records.items():
        s = summarize_problems(((r["n"], r["correct"]) for r in recs), k)
        lens = [t for r in recs for t in r.get("response_tokens", [])]
        reasons = [f for r in recs for f in r.get("finish_reasons", [])]
        s["mean_response_tokens"] = sum(lens) / len(lens) if lens else math.nan
        s["truncated_frac"] = (
            sum(1 for f in reasons if f == "length") / len(reasons) if reasons else math.nan
        )
        s["reward_failures"] = float(sum(r.get("reward_failures", 0) for r in recs))
        summary[name] = s
    rows = list(summary.values())
    keys = [k_ for k_ in (rows[0] if rows else {}) if k_ not in ("n_problems", "reward_failures")]
    summary[AVERAGE] = {
        "n_problems": float(sum(r["n_problems"] for r in rows)),
        **mean_over(rows, keys),
    }
    return summary


def evaluate(
    engine: Any,
    benchmarks: Sequence[Benchmark],
    settings: EvalSettings,
    *,
    tokenizer: Any,
    reward: Callable[[list[str], list[str]], Any],
    results_path: str | Path | None = None,
    concurrency: int = 1,
    save_responses: bool = False,
    on_problem: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
) -> EvalReport:
    """Evaluate `benchmarks` with `engine` (a `rollout.base.RolloutEngine`).

    Args:
        tokenizer: renders prompts (`data.templates.render_prompt` with `settings.template()`).
        reward: `reward(completions, references) -> result` with `.scores` (0/1 per
            completion) and optionally `.answers`, `.n_failed` (a `reward.math.MathReward`).
        results_path: resume file (module docstring); None keeps everything in memory.
        concurrency: problems in flight at once (threads calling `engine.generate`); 1 for the
            local engine, tens for SGLang.
        on_problem: called with each new record (progress bars).
        stop_after: sample at most this many problems, then return (a partial report; the
            resume file holds them). For wall-clock-limited jobs and the resume tests.
    """
    settings.validate()
    if concurrency < 1:
        raise ValueError(f"evaluate: concurrency={concurrency} must be >= 1")
    path = Path(results_path) if results_path is not None else None
    meta, done = read_results(path, settings) if path is not None else (None, {})
    writer = _ResultsWriter(path, settings, meta is not None) if path is not None else None
    template = settings.template()
    records: dict[str, list[dict]] = {b.name: [] for b in benchmarks}
    todo: list[tuple[Benchmark, BenchProblem]] = []
    n_resumed = 0
    for bench in benchmarks:
        _check_records(bench, done, path)
        for prob in bench.problems:
            rec = done.get((bench.name, prob.uid))
            if rec is not None:
                if int(rec["n"]) != settings.k:
                    raise ResumeError(
                        f"{path}: {bench.name} problem {prob.uid} has n={rec['n']} samples, "
                        f"not k={settings.k}; use a new --out"
                    )
                records[bench.name].append(rec)
                n_resumed += 1
            else:
                todo.append((bench, prob))
    if stop_after is not None:
        todo = todo[: max(0, int(stop_after))]

    def sample(item: tuple[Benchmark, BenchProblem]):
        bench, prob = item
        ids = render_prompt(tokenizer, prob.problem, template).token_ids
        req = GenerateRequest(prompt_token_ids=ids, request_id=f"{bench.name}/{prob.uid}")
        sp = settings.sampling(problem_seed(settings.seed, bench.name, prob.uid))
        out = engine.generate([req], sp)
        if len(out) != 1 or len(out[0]) != settings.k:
            got = [len(o) for o in out]
            raise RuntimeError(
                f"evaluate: engine {type(engine).__name__} returned {got} completions for 1 "
                f"request with n={settings.k}"
            )
        return out[0]

    def finish(item: tuple[Benchmark, BenchProblem], completions: Sequence[Any]) -> None:
        bench, prob = item
        rec = _score_problem(bench, prob, completions, reward, save_responses)
        if writer is not None:
            writer.write(rec)
        records[bench.name].append(rec)
        if on_problem is not None:
            on_problem(rec)

    try:
        if concurrency == 1:
            for item in todo:
                finish(item, sample(item))
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                pending: dict[Future, tuple[Benchmark, BenchProblem]] = {}
                queue = list(reversed(todo))
                while queue or pending:
                    while queue and len(pending) < concurrency:
                        item = queue.pop()
                        pending[pool.submit(sample, item)] = item
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        finish(pending.pop(fut), fut.result())
    finally:
        if writer is not None:
            writer.close()
    order = {(b.name, p.uid): p.index for b in benchmarks for p in b.problems}
    for name, recs in records.items():
        recs.sort(key=lambda r, name=name: order[(name, r["uid"])])
    return EvalReport(
        settings=settings,
        records=records,
        summary=summarize(records, settings.k),
        n_sampled=len(todo),
        n_resumed=n_resumed,
    )


def flat_metrics(summary: dict[str, dict[str, float]], prefix: str = "eval/") -> dict[str, float]:
    """``{"<prefix><benchmark>/<metric>": value}`` for the trainer's metric logger."""
    return {
        f"{prefix}{bench}/{key}": float(v)
        for bench, row in summary.items()
        for key, v in row.items()
        if not (isinstance(v, float) and math.isnan(v))
    }


def run_eval(
    engine: Any,
    benchmarks: Sequence[Benchmark],
    k: int,
    *,
    tokenizer: Any,
    reward: Callable[[list[str], list[str]], Any] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    max_new_tokens: int = 1024,
    seed: int = 0,
    template: PromptTemplate | None = None,
    concurrency: int = 1,
    prefix: str = "eval/",
    results_path: str | Path | None = None,
    teacher_template: str | None = None,
) -> dict[str, float]:
    """In-training eval: avg@k / pass@k of the engine's current weights, as flat metrics.

    Returns ``{"eval/<bench>/avg@<k>", "eval/<bench>/pass@<j>", "eval/<bench>/n_problems",
    "eval/<bench>/mean_response_tokens", "eval/<bench>/truncated_frac", ...,
    "eval/average/..."}``. `reward` defaults to a fresh `MathReward` (closed afterwards); pass
    the trainer's to reuse its workers. `seed`: keep it fixed across steps (e.g.
    `rollout.seed`): every eval then draws the same random numbers, so step-to-step changes
    come from the weights, and a resumed run evaluates exactly what the uninterrupted one did.
    `teacher_template`: also the teacher-accuracy probe (`eval/teacher/...`,
    `eval.teacher_probe.teacher_eval_metrics`).
    """
    t = template or PromptTemplate()
    settings = EvalSettings(
        k=k,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        seed=seed,
        model=f"weight_version={getattr(engine, 'weight_version', 0)}",
        instruction=t.instruction,
        system_prompt=t.system_prompt,
        use_chat_template=t.use_chat_template,
        chat_template_kwargs=dict(t.chat_template_kwargs),
    )
    own = reward is None
    if own:
        from rlrt_megatron.reward.math import MathReward

        reward = MathReward()
    try:
        report = evaluate(
            engine,
            benchmarks,
            settings,
            tokenizer=tokenizer,
            reward=reward,
            concurrency=concurrency,
            results_path=results_path,
            save_responses=teacher_template is not None,
        )
        out = flat_metrics(report.summary, prefix)
        if teacher_template is not None:
            from rlrt_megatron.eval.teacher_probe import teacher_eval_metrics

            out.update(
                teacher_eval_metrics(
                    engine,
                    report.records,
                    {(b.name, p.uid): p for b in benchmarks for p in b.problems},
                    tokenizer=tokenizer,
                    reward=reward,
                    sampling=settings.sampling(seed),
                    teacher_template=teacher_template,
                    template=t,
                    prefix=prefix,
                )
            )
    finally:
        if own:
            reward.close()  # type: ignore[union-attr]
    return out
