"""Teacher diagnostics of the trainer (issue 23): is the teacher informative?

`teacher_metrics`: the per-step `delta/*` metrics (Delta = teacher - student log-prob of the
sampled tokens; `delta/correct_mean` vs `delta/wrong_mean` and their `gap`); `check_teacher`: the
warning when the gap stays small; `teacher_prefix_cap`: the longest teacher prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from rlrt_megatron.config import TrainConfig


def teacher_prefix_cap(cfg: TrainConfig) -> int:
    """The longest teacher prompt (tokens): `data.max_teacher_prompt_tokens`, or when 0 the
    student prompt's limit plus a full-length peer solution and 64 tokens of template."""
    cap = cfg.data.max_teacher_prompt_tokens
    return cap if cap > 0 else cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens + 64


def teacher_metrics(batch: Any, correct: torch.Tensor) -> dict[str, float]:
    """Delta = teacher - student log-prob of the sampled tokens. `delta/mean`, `abs_mean`,
    `std`: over the rows the algorithm uses; `delta/correct_mean`, `delta/wrong_mean`: over
    correct / wrong rollouts among every row the teacher saw (used rows and probe rows),
    `delta/gap` their difference (the teacher separates right from wrong when it is > 0)."""
    mask = batch.mask.bool()
    delta = batch.teacher_logprobs - batch.student_logprobs
    seen = batch.has_teacher | batch.teacher_probe
    sel = {
        "used": mask & batch.has_teacher[:, None],
        "correct": mask & (seen & correct)[:, None],
        "wrong": mask & (seen & ~correct)[:, None],
    }
    # one host transfer for every sum
    sums = (
        torch.stack(
            [
                x
                for s in sel.values()
                for x in (
                    s.sum(),
                    (delta * s).sum(),
                    (delta.abs() * s).sum(),
                    (delta.square() * s).sum(),
                )
            ]  # fmt: skip
        )
        .double()
        .tolist()
    )
    m: dict[str, float] = {}
    n, tot, ab, sq = sums[0:4]
    if n > 0:
        mean = tot / n
        var = max(sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
        m.update({"delta/mean": mean, "delta/abs_mean": ab / n, "delta/std": var**0.5})
    for j, name in ((4, "correct"), (8, "wrong")):
        if sums[j] > 0:
            m[f"delta/{name}_mean"] = sums[j + 1] / sums[j]
    if "delta/correct_mean" in m and "delta/wrong_mean" in m:
        m["delta/gap"] = m["delta/correct_mean"] - m["delta/wrong_mean"]
    return m


def check_teacher(run: Any, m: dict[str, Any]) -> None:
    """Log a warning when `delta/gap` stayed below `teacher.warn_gap` for `teacher.warn_steps`
    steps in a row (once per such stretch): the teacher is not informative."""
    t = run.cfg.teacher
    gap = m.get("delta/gap")
    if t.warn_steps <= 0 or gap is None:
        return
    low = run.extra.get("teacher_low_steps", 0) + 1 if gap < t.warn_gap else 0
    run.extra["teacher_low_steps"] = low
    if low == t.warn_steps:
        run.logger.message(
            f"warning: the teacher does not separate right from wrong rollouts: delta/gap "
            f"(delta/correct_mean - delta/wrong_mean) < teacher.warn_gap={t.warn_gap} for "
            f"{low} steps (now {gap:.3f}). Teacher-based algorithms reweight or distil towards "
            "noise; check that the model can read data.teacher_template (tiny demo: "
            "model.sft_teacher_frac) or use GRPO/DAPO"
        )
