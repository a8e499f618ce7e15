"""The eval's teacher-accuracy probe: is the teacher view better than the student?

For every eval problem with at least one correct sample, the teacher prompt
(`data.teacher_template`, the RLRT/SDPO/SRPO context) shows the first correct sample (its answer
part) and the model samples k completions from it. `eval/teacher/<bench>/avg@k` is their
accuracy; `eval/teacher/<bench>/student_avg@k` the student's accuracy on the SAME problems (the
probe only sees problems the student solved at least once, so the overall avg@k would flatter
the student's side less), `eval/teacher/<bench>/n_problems` how many there were. A teacher that
reads its context copies the shown solution: its avg@k should be well above the student's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlrt_megatron.data.teacher import render_teacher_prompt, strip_thinking
from rlrt_megatron.data.templates import PromptTemplate
from rlrt_megatron.rollout.base import GenerateRequest, SamplingParams


def teacher_eval_metrics(
    engine: Any,
    records: dict[str, list[dict]],
    problems: dict[tuple[str, str], Any],
    *,
    tokenizer: Any,
    reward: Callable[[list[str], list[str]], Any],
    sampling: SamplingParams,
    teacher_template: str,
    template: PromptTemplate,
    prefix: str = "eval/",
) -> dict[str, float]:
    """`records`: the eval's per-problem records with `responses` (`evaluate(...,
    save_responses=True)`); `problems`: `(benchmark, uid) -> BenchProblem`."""
    out: dict[str, float] = {}
    k = sampling.n
    for bench, recs in records.items():
        chosen = [r for r in recs if any(s >= 0.5 for s in r["scores"])]
        key = f"{prefix}teacher/{bench}"
        out[f"{key}/n_problems"] = float(len(chosen))
        if not chosen:
            continue
        probs = [problems[(bench, r["uid"])] for r in chosen]
        reqs: list[GenerateRequest] = []
        for r, p in zip(chosen, probs, strict=True):
            first = next(i for i, s in enumerate(r["scores"]) if s >= 0.5)
            shown = strip_thinking(r["responses"][first])
            ids = render_teacher_prompt(tokenizer, p.problem, shown, teacher_template, template)[1]
            reqs.append(GenerateRequest(prompt_token_ids=ids, request_id=f"teacher/{r['uid']}"))
        outs = engine.generate(reqs, sampling)
        texts = [c.text for group in outs for c in group]
        refs = [p.answer for p in probs for _ in range(k)]
        scores = [float(s) for s in reward(texts, refs).scores]
        out[f"{key}/avg@{k}"] = sum(scores) / len(scores)
        student = [s for r in chosen for s in r["scores"]]
        out[f"{key}/student_avg@{k}"] = sum(student) / len(student)
    return out
